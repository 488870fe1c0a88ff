"""Outbound HTTP that cannot be turned against us: the one guard for `http.request` and webhooks.

Only http and https; the host is resolved once and the connection goes to that address,
so DNS cannot change its answer between the check and the request; every address that is
not globally routable (private, loopback, link-local and cloud metadata, carrier-grade
NAT, multicast, reserved, documentation, transition prefixes) is refused unless the host
is on the allow-list; redirects are never followed; the body read is capped. A refusal
says "blocked destination" and never which address a name resolved to, nor whether it
resolved at all: job errors are tenant-visible, and either would map the internal DNS.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from conveyor.errors import PermanentError
from conveyor.telemetry.tracing import annotate, outbound_span

logger = logging.getLogger(__name__)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# IANA special-purpose blocks that are not globally reachable but that Python 3.11's
# `is_global` calls global (or that a later IANA entry added), and the IPv6 transition
# prefixes nobody needs to call out through: 6to4 and Teredo are deprecated, local-use
# NAT64 is local by definition, and IPv4-compatible addresses are obsolete.
NON_GLOBAL_NETWORKS = tuple(
    ipaddress.ip_network(block)
    for block in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # carrier-grade NAT (shared address space); some cloud metadata
        "192.0.0.0/24",  # IETF protocol assignments
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "198.18.0.0/15",  # benchmarking
        "240.0.0.0/4",  # reserved, and the limited broadcast address
        "::/96",  # IPv4-compatible (deprecated), with :: and ::1
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, Teredo (2001::/32) among them
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing (SRv6) SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
# Translated IPv6 that stands for an IPv4 address: judged by that address. DNS64 on an
# IPv6-only host answers with the well-known NAT64 prefix for public IPv4-only sites.
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedDestination(PermanentError):
    """Raised when a URL points somewhere outbound requests may not go."""


@dataclass(frozen=True)
class Response:
    """What came back, capped."""

    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def globally_routable(address: IPAddress) -> bool:
    """Return whether outbound requests may go to `address` without an allow-list entry."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return globally_routable(address.ipv4_mapped)
        if address in NAT64:
            return globally_routable(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if any(address in network for network in NON_GLOBAL_NETWORKS):
        return False
    # is_global alone lets multicast and some reserved IPv4 through.
    return address.is_global and not (address.is_multicast or address.is_reserved)


def resolve(url: str, allow_hosts: frozenset[str]) -> tuple[str, str, int, str]:
    """Check a URL and pin its address: return (scheme, host, port, ip) or raise."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise BlockedDestination("blocked destination: only http and https URLs are allowed")
    host = parts.hostname.lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # One message whether the name failed to resolve or resolved somewhere private.
    blocked = f"blocked destination: {host} does not resolve, or resolves to a non-public address"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        logger.info("outbound host %s does not resolve: %s", host, exc)
        raise BlockedDestination(blocked) from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if host not in allow_hosts:
        # Every answer must be public: a name with one private answer is refused whole.
        bad = [str(a) for a in addresses if not globally_routable(a) and str(a) not in allow_hosts]
        if bad:
            # The operator may see the address; the caller (the job's error) may not.
            logger.info("outbound host %s resolves to non-public %s", host, bad[0])
            raise BlockedDestination(blocked)
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
    # No instrumentation covers http.client: the call's client span is Conveyor's own.
    with outbound_span(method, url, send_headers):
        return _exchange(connection, method, target, body, send_headers, max_bytes, started)


def _exchange(
    connection: http.client.HTTPConnection,
    method: str,
    target: str,
    body: bytes | None,
    headers: dict[str, str],
    max_bytes: int,
    started: float,
) -> Response:
    """Send the request on `connection` and read the capped answer."""
    try:
        connection.request(method, target, body=body, headers=headers)
        answer = connection.getresponse()
        annotate({"http.response.status_code": answer.status})
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
