"""Outbound HTTP that cannot be turned against us: the one guard for `http.request` and webhooks.

Only http and https; the host is resolved once and the connection goes to that address,
so DNS cannot change its answer between the check and the request; private, loopback,
link-local (cloud metadata), multicast and reserved addresses are refused unless the
host is on the allow-list; redirects are never followed; the body read is capped.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from conveyor.errors import PermanentError


class BlockedDestination(PermanentError):
    """Raised when a URL points somewhere outbound requests may not go."""


@dataclass(frozen=True)
class Response:
    """What came back, capped."""

    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def resolve(url: str, allow_hosts: frozenset[str]) -> tuple[str, str, int, str]:
    """Check a URL and pin its address: return (scheme, host, port, ip) or raise."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise BlockedDestination(f"only http and https URLs are allowed, not {url[:100]!r}")
    host = parts.hostname.lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BlockedDestination(f"cannot resolve {host}") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if host not in allow_hosts:
        # Every answer must be public: a name with one private answer is refused whole.
        bad = [str(a) for a in addresses if _forbidden(a) and str(a) not in allow_hosts]
        if bad:
            raise BlockedDestination(f"{host} resolves to a non-public address ({bad[0]})")
    return parts.scheme, host, port, str(addresses[0])


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address, verifying the certificate for the original host name."""

    def __init__(self, ip: str, port: int, hostname: str, timeout: float) -> None:
        super().__init__(ip, port, timeout=timeout, context=ssl.create_default_context())
        self._hostname = hostname

    def connect(self) -> None:
        """Connect to the pinned address with SNI and checks for the real host."""
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._hostname)  # type: ignore[attr-defined]


def request(
    method: str,
    url: str,
    *,
    allow_hosts: frozenset[str],
    headers: dict[str, str] | None = None,
    json_body: Any = None,
    body: bytes | None = None,
    timeout: float = 10.0,
    max_bytes: int = 1024 * 1024,
) -> Response:
    """Send one request through the guard; 3xx answers are returned, never followed."""
    scheme, host, port, ip = resolve(url, allow_hosts)
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    send_headers = {"Host": parts.netloc, "User-Agent": "Conveyor/1", **(headers or {})}
    if json_body is not None:
        body = json.dumps(json_body).encode()
        send_headers.setdefault("Content-Type", "application/json")
    connection: http.client.HTTPConnection
    if scheme == "https":
        connection = _PinnedHTTPSConnection(ip, port, host, timeout)
    else:
        connection = http.client.HTTPConnection(ip, port, timeout=timeout)
    started = time.monotonic()
    try:
        connection.request(method, target, body=body, headers=send_headers)
        answer = connection.getresponse()
        data = answer.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PermanentError(f"the response is larger than {max_bytes} bytes")
        return Response(
            answer.status,
            {k.lower(): v for k, v in answer.getheaders()},
            data,
            time.monotonic() - started,
        )
    finally:
        connection.close()
