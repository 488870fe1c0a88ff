"""The API's real server (gunicorn, gevent workers) holds idle streams without holding workers.

One worker process holds 200 open streams and still answers plain requests at once; a
transition committed meanwhile reaches a stream. A sync worker would hold one stream and
queue everything behind it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.auth.bootstrap import Identity
from conveyor.ledger.transitions import claim
from conveyor.ledger.upkeep import beat_heartbeats
from conveyor.ledger.work import Work
from conveyor.settings import Settings
from devtools.embedded import free_port
from tests.conftest import wait_for
from tests.processes import BIN, ROOT, process_env, stop

STREAMS = 200


def test_the_gunicorn_master_never_imports_psycopg() -> None:
    # gevent patches the standard library in each worker, before the app is imported; a
    # psycopg imported earlier, in the master, would stay blocking (shared/PITFALLS.md).
    out = subprocess.run(
        [sys.executable, "-c", "import sys, api.gunicorn_config; print('psycopg' in sys.modules)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "False"


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """Run the API as the Procfile does, with one worker process; stop it by pid."""
    port = free_port()
    env = process_env(settings, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    command = [
        str(BIN / "gunicorn"),
        "--config",
        "python:api.gunicorn_config",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "api:create_app()",
    ]
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=60)
        yield url
    finally:
        stop(proc, timeout=30)
        log.close()


def open_stream(url: str, path: str, token: str) -> socket.socket:
    """Open an event stream on a raw socket and read up to its first frame."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"retry:" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.e2e
def test_a_worker_holds_hundreds_of_idle_streams_and_still_answers(
    server: str, identity: Identity, work: Work
) -> None:
    token = identity.token
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server, headers=headers, timeout=10) as http:
        job: dict[str, Any] = http.post("/v1/jobs", json={"type": "system.noop"}).json()
        watched = open_stream(server, f"/v1/jobs/{job['id']}/stream", token)
        idle = [open_stream(server, "/v1/events/stream", token) for _ in range(STREAMS)]
        try:
            started = time.monotonic()
            for _ in range(20):
                assert http.get(f"/v1/jobs/{job['id']}").status_code == 200
            assert time.monotonic() - started < 5  # one worker, 201 streams open
            with work.single_statement() as unit:
                claimed = claim(unit, uuid.UUID(job["id"]), "w1", datetime.now(UTC))
            assert claimed is not None
            # As the worker's first heartbeat does: the claim is durable, its view shown.
            with work.single_statement() as unit:
                beat_heartbeats(unit, [claimed], datetime.now(UTC))
            data = read_until(watched, b'"state":"running"')
            frame = data[data.rindex(b"data: ") + 6 :].split(b"\n", 1)[0]
            assert json.loads(frame)["id"] == job["id"]
            # The tenant's streams see the transition too.
            assert b'"state":"running"' in read_until(idle[0], b'"state":"running"')
        finally:
            for sock in [watched, *idle]:
                sock.close()
