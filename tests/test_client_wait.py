"""The Python client's `wait()`: the job's event stream, and the long poll when there is none."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from conveyor.client import Client
from conveyor.ledger.transitions import claim, succeed
from conveyor.ledger.upkeep import beat_heartbeats
from conveyor.ledger.work import Work
from conveyor.live.store import progress_document


class Recording(httpx.BaseTransport):
    """The in-process app, recording each request; optionally refusing event streams."""

    def __init__(self, app: Any, *, refuse_streams: bool = False) -> None:
        self._inner = httpx.WSGITransport(app=app)
        self._refuse = refuse_streams
        self.requests: list[httpx.URL] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Record the request, then answer it (a 502 for a refused stream, as a proxy would)."""
        self.requests.append(request.url)
        if self._refuse and request.url.path.endswith("/stream"):
            return httpx.Response(502, text="bad gateway")
        return self._inner.handle_request(request)


def run_later(
    work: Work, job_id: str, progress_seen: threading.Event | None = None
) -> threading.Thread:
    """Claim, report progress and finish the job from another thread, a moment from now."""

    def run() -> None:
        assert work.live is not None
        with work.single_statement() as unit:
            claimed = claim(unit, uuid.UUID(job_id), "w1", datetime.now(UTC))
        assert claimed is not None
        # As the worker's progress reporter does: a heartbeat first shows the claim.
        with work.single_statement() as unit:
            beat_heartbeats(unit, [claimed], datetime.now(UTC))
        work.live.set_progress(claimed.id, progress_document(1, 4, "a quarter"))
        if progress_seen is not None:
            progress_seen.wait(10)  # the report reached the client before the job finishes
        with work.begin() as unit:
            assert succeed(unit, claimed, {"n": 1}, datetime.now(UTC))

    thread = threading.Timer(0.3, run)
    thread.start()
    return thread


@pytest.fixture
def make_client(app: Any, identity: Any) -> Iterator[Any]:
    clients: list[Client] = []

    def make(transport: Recording) -> Client:
        client = Client("http://conveyor.test", identity.token, transport=transport)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_wait_follows_the_stream_with_every_progress_report(
    app: Any, make_client: Any, work: Work
) -> None:
    transport = Recording(app)
    client = make_client(transport)
    job = client.submit("system.noop")
    updates: list[tuple[str, Any]] = []
    seen = threading.Event()

    def update(j: dict[str, Any]) -> None:
        updates.append((j["state"], (j["progress"] or {}).get("percent")))
        if j["progress"]:
            seen.set()

    runner = run_later(work, job["id"], seen)
    done = client.wait(job["id"], timeout=20, on_update=update)
    runner.join()
    assert done["state"] == "succeeded"
    assert updates == [("queued", None), ("running", None), ("running", 25.0), ("succeeded", None)]
    # One request for the submit, one for the stream: no polling.
    assert [url.path for url in transport.requests][1:] == [f"/v1/jobs/{job['id']}/stream"]


def test_wait_falls_back_to_the_long_poll_when_streams_are_refused(
    app: Any, make_client: Any, work: Work
) -> None:
    transport = Recording(app, refuse_streams=True)
    client = make_client(transport)
    job = client.submit("system.noop")
    runner = run_later(work, job["id"])
    done = client.wait(job["id"], timeout=20)
    runner.join()
    assert done["state"] == "succeeded"
    polls = [url for url in transport.requests if url.path == f"/v1/jobs/{job['id']}"]
    # The first poll learns the ETag; the next ones wait for a change instead of repeating.
    assert polls[0].params.get("wait") is None
    assert all(url.params.get("wait") for url in polls[1:])
    assert len(polls) <= 4
