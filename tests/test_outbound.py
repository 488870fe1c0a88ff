"""The outbound guard: SSRF attempts refused, allowed hosts reached, redirects not followed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from conveyor.outbound import BlockedDestination, request, resolve
from tests.conftest import wait_for
from tests.test_e2e import finished

NOTHING_ALLOWED: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost:8080/admin",
        "http://2130706433/",  # 127.0.0.1 written as one number
        "http://0.0.0.0/",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://172.16.0.1/",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1]/",
        "ftp://example.com/file",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "http:///nohost",
    ],
)
def test_private_and_odd_destinations_are_refused(url: str) -> None:
    with pytest.raises(BlockedDestination):
        resolve(url, NOTHING_ALLOWED)


def test_an_allowed_host_passes() -> None:
    assert resolve("http://127.0.0.1:9/x", frozenset({"127.0.0.1"}))[3] == "127.0.0.1"
    # Allowing the address does not allow every name that resolves to it.
    with pytest.raises(BlockedDestination):
        resolve("http://localhost:9/x", frozenset({"10.0.0.1"}))


class _Handler(BaseHTTPRequestHandler):
    calls: list[str] = []  # noqa: RUF012 - shared by the test server's handlers

    def do_GET(self) -> None:
        self.calls.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        body = b'{"ok": true}' if self.path != "/big" else b"x" * 5000
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_requests_reach_an_allowed_local_server_and_never_follow_redirects(
    local_server: str,
) -> None:
    allowed = frozenset({"127.0.0.1"})
    answer = request("GET", f"{local_server}/hello", allow_hosts=allowed)
    assert (answer.status, answer.body) == (200, b'{"ok": true}')
    redirected = request("GET", f"{local_server}/redirect", allow_hosts=allowed)
    assert redirected.status == 302
    assert _Handler.calls[-1] == "/redirect"  # the metadata address was never asked
    with pytest.raises(Exception, match="larger than 1024 bytes"):
        request("GET", f"{local_server}/big", allow_hosts=allowed, max_bytes=1024)


def test_http_request_jobs_are_guarded(
    worker: Any, client: Any, auth: dict[str, str], local_server: str
) -> None:
    def run(url: str) -> dict[str, Any]:
        job = client.post(
            "/v1/jobs", json={"type": "http.request", "payload": {"url": url}}, headers=auth
        ).get_json()
        body: dict[str, Any] = wait_for(lambda: finished(client, auth, job["id"]))
        return body

    # The test worker's settings allow nothing private: the local server is refused.
    refused = run(f"{local_server}/hello")
    assert (refused["state"], refused["attempts"]) == ("failed", 1)
    assert refused["error"]["type"] == "BlockedDestination"
    assert "non-public address" in refused["error"]["message"]
    worker.conveyor.settings.outbound_allow_hosts.append("127.0.0.1")
    try:
        reached = run(f"{local_server}/hello")
    finally:
        worker.conveyor.settings.outbound_allow_hosts.remove("127.0.0.1")
    assert reached["state"] == "succeeded"
    assert reached["result"]["status"] == 200
    assert reached["result"]["body"] == '{"ok": true}'
