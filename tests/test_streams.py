"""Live status (issue #20): job and tenant event streams, resume, walls, the long poll.

Against the real API app, PostgreSQL and Redis: transitions are committed through the
ledger's units of work, and every change reaches the streams through Redis pub/sub.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import streams
from conveyor.ledger.transitions import claim, succeed
from conveyor.ledger.upkeep import beat_heartbeats
from conveyor.ledger.work import Work
from conveyor.live import events
from conveyor.live.store import LiveStore, progress_document
from conveyor.models import JobEvent
from conveyor.settings import Settings
from tests.factories import other_tenant

TIMEOUT = 10.0


class Frames:
    """The frames of one open stream, read by a thread, taken one at a time with a timeout."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self._frames: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = ""
        try:
            for chunk in self.response.response:
                buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    self._frames.put(parse(block))
                if self._stop.is_set():
                    break
        finally:
            self._frames.put(None)  # the stream ended
            # Closed by the thread that iterates it (a generator cannot be closed from
            # another thread while it runs): the stream's subscription ends with it.
            self.response.close()

    def next(self, *, skip_pings: bool = True) -> dict[str, Any] | None:
        """Return the next frame (None when the stream ended); fail after TIMEOUT."""
        while True:
            frame = self._frames.get(timeout=TIMEOUT)
            if frame is not None and skip_pings and ("ping" in frame or "retry" in frame):
                continue
            return frame

    def assert_quiet(self, seconds: float) -> None:
        """Fail if anything but a heartbeat arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = self._frames.get(timeout=left)
            except queue.Empty:
                return
            assert frame is not None
            assert "ping" in frame, frame

    def close(self) -> None:
        """Leave the stream, as a client that disconnects (noticed at the next heartbeat)."""
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()


def parse(block: str) -> dict[str, Any]:
    frame: dict[str, Any] = {}
    for line in block.splitlines():
        if line.startswith(":"):
            frame["ping"] = True
            continue
        name, _, value = line.partition(": ")
        frame[name] = json.loads(value) if name == "data" else value
    return frame


@contextlib.contextmanager
def opened(client: Any, url: str, headers: dict[str, str]) -> Iterator[Frames]:
    response = client.get(url, headers=headers, buffered=False)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    assert response.headers["X-Accel-Buffering"] == "no"
    frames = Frames(response)
    try:
        yield frames
    finally:
        frames.close()


def submit(client: Any, headers: dict[str, str], **body: Any) -> str:
    response = client.post("/v1/jobs", json={"type": "system.noop", **body}, headers=headers)
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def event_ids(sessions: sessionmaker[Session], job_id: str) -> list[int]:
    with sessions() as session:
        return list(
            session.scalars(
                select(JobEvent.id)
                .where(JobEvent.job_id == uuid.UUID(job_id))
                .order_by(JobEvent.id)
            )
        )


def run_to_success(work: Work, job_id: str, store: LiveStore | None = None) -> None:
    with work.single_statement() as unit:
        claimed = claim(unit, uuid.UUID(job_id), "w1", datetime.now(UTC))
    assert claimed is not None
    if store is not None:
        # As the worker's progress reporter does: a heartbeat first shows the claim.
        with work.single_statement() as unit:
            beat_heartbeats(unit, [claimed], datetime.now(UTC))
        store.set_progress(uuid.UUID(job_id), progress_document(5, 10, "half"))
    with work.begin() as unit:
        assert succeed(unit, claimed, {"ok": True}, datetime.now(UTC))


@pytest.fixture(autouse=True)
def quick_heartbeats(monkeypatch: Any) -> None:
    """Heartbeat often: a test's stream notices its client left at the next one."""
    monkeypatch.setattr(streams, "HEARTBEAT_SECONDS", 0.2)


@pytest.fixture
def store(work: Work) -> LiveStore:
    assert work.live is not None
    return work.live


def test_a_job_stream_sends_each_transition_and_progress_in_order_then_ends(
    client: Any, auth: dict[str, str], work: Work, store: LiveStore, sessions: Any
) -> None:
    job_id = submit(client, auth)
    with opened(client, f"/v1/jobs/{job_id}/stream", auth) as frames:
        first = frames.next()
        assert first is not None
        assert (first["event"], first["data"]["state"]) == ("state", "queued")
        run_to_success(work, job_id, store)
        running, progress, done = frames.next(), frames.next(), frames.next()
        assert frames.next() is None  # ended after the terminal state
    assert running
    assert progress
    assert done
    assert (running["event"], running["data"]["state"]) == ("state", "running")
    assert (progress["event"], progress["data"]["progress"]["percent"]) == ("progress", 50.0)
    assert progress["id"] == running["id"]  # a progress report resumes after its transition
    assert (done["event"], done["data"]["state"], done["data"]["result"]) == (
        "state",
        "succeeded",
        {"ok": True},
    )
    ids = [int(f["id"]) for f in (first, running, done)]
    assert ids == event_ids(sessions, job_id)


def test_last_event_id_resumes_without_loss_or_repeats(
    client: Any, auth: dict[str, str], work: Work, sessions: Any
) -> None:
    job_id = submit(client, auth)
    run_to_success(work, job_id)
    queued, running, succeeded = event_ids(sessions, job_id)
    resumed = {**auth, "Last-Event-ID": str(queued)}
    with opened(client, f"/v1/jobs/{job_id}/stream", resumed) as frames:
        got = [frames.next(), frames.next(), frames.next()]
    assert [(int(f["id"]), f["data"]["state"]) for f in got if f] == [
        (running, "running"),
        (succeeded, "succeeded"),
    ]
    assert got[2] is None
    # The same through the query string (for clients that cannot set headers).
    url = f"/v1/jobs/{job_id}/stream?last_event_id={running}"
    with opened(client, url, auth) as frames:
        last = frames.next()
        assert last is not None
        assert int(last["id"]) == succeeded
        assert frames.next() is None


def test_a_finished_job_streams_its_state_once_and_ends(
    client: Any, auth: dict[str, str], work: Work
) -> None:
    job_id = submit(client, auth)
    run_to_success(work, job_id)
    with opened(client, f"/v1/jobs/{job_id}/stream", auth) as frames:
        only = frames.next()
        assert only is not None
        assert only["data"]["state"] == "succeeded"
        assert frames.next() is None


def test_a_subscriber_that_falls_behind_is_resumed_from_job_events(
    client: Any, auth: dict[str, str], work: Work, sessions: Any, monkeypatch: Any
) -> None:
    # No room at all: every change overflows the buffer and marks the subscriber behind,
    # so every frame after the first is read back from job_events.
    monkeypatch.setattr(events, "BUFFER", 0)
    job_id = submit(client, auth)
    with opened(client, f"/v1/jobs/{job_id}/stream", auth) as frames:
        first = frames.next()
        run_to_success(work, job_id)
        rest = [frames.next(), frames.next()]
        assert frames.next() is None
    got = [first, *rest]
    assert [f["data"]["state"] for f in got if f] == ["queued", "running", "succeeded"]
    assert [int(f["id"]) for f in got if f] == event_ids(sessions, job_id)


def test_two_tenants_streams_side_by_side_see_only_their_own(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    work: Work,
) -> None:
    other = other_tenant(sessions, settings)
    theirs = {"Authorization": f"Bearer {other.token}"}
    with (
        opened(client, "/v1/events/stream", auth) as ours_stream,
        opened(client, "/v1/events/stream", theirs) as their_stream,
    ):
        mine = submit(client, auth, tags=["a"])
        their_job = submit(client, theirs, tags=["b"])
        run_to_success(work, their_job)
        run_to_success(work, mine)
        ours = [ours_stream.next() for _ in range(3)]
        their = [their_stream.next() for _ in range(3)]
        # Nothing more arrives on either: the other tenant's transitions never do.
        ours_stream.assert_quiet(0.5)
        their_stream.assert_quiet(0.5)
    assert {f["data"]["id"] for f in ours if f} == {mine}
    assert {f["data"]["id"] for f in their if f} == {their_job}
    assert [f["data"]["state"] for f in ours if f] == ["queued", "running", "succeeded"]
    # Another tenant's job stream is a 404, like its job.
    assert client.get(f"/v1/jobs/{mine}/stream", headers=theirs).status_code == 404


def test_a_tenant_stream_filters_and_resumes_from_the_ledger(
    client: Any, auth: dict[str, str], work: Work, sessions: Any
) -> None:
    job_id = submit(client, auth, tags=["nightly"])
    other = submit(client, auth)
    run_to_success(work, job_id)
    run_to_success(work, other)
    first = event_ids(sessions, job_id)[0]
    url = f"/v1/events/stream?tag=nightly&state=succeeded&last_event_id={first - 1}"
    with opened(client, url, auth) as frames:
        got = frames.next()
        assert got is not None
        assert (got["data"]["id"], got["data"]["state"]) == (job_id, "succeeded")
        assert int(got["id"]) == event_ids(sessions, job_id)[-1]
        frames.assert_quiet(0.3)


def test_an_idle_stream_sends_heartbeats(
    client: Any, auth: dict[str, str], monkeypatch: Any
) -> None:
    monkeypatch.setattr(streams, "HEARTBEAT_SECONDS", 0.1)
    with opened(client, "/v1/events/stream", auth) as frames:
        assert frames.next(skip_pings=False) == {"retry": "1000"}
        assert frames.next(skip_pings=False) == {"ping": True}


def test_a_rolled_back_transition_is_never_streamed(
    client: Any, auth: dict[str, str], work: Work
) -> None:
    job_id = submit(client, auth)
    with opened(client, f"/v1/jobs/{job_id}/stream", auth) as frames:
        assert frames.next() is not None
        with contextlib.suppress(RuntimeError), work.begin() as unit:
            claim(unit, uuid.UUID(job_id), "w1", datetime.now(UTC))
            raise RuntimeError("roll back")
        frames.assert_quiet(0.5)


def test_the_long_poll_answers_on_change_or_304_after_the_wait(
    client: Any, auth: dict[str, str], work: Work
) -> None:
    job_id = submit(client, auth)
    first = client.get(f"/v1/jobs/{job_id}", headers=auth)
    etag = first.headers["ETag"]
    waiting = {**auth, "If-None-Match": etag}
    # Without wait: 304 at once, as before.
    assert client.get(f"/v1/jobs/{job_id}", headers=waiting).status_code == 304
    started = time.monotonic()
    unchanged = client.get(f"/v1/jobs/{job_id}?wait=0.5", headers=waiting)
    assert unchanged.status_code == 304
    assert time.monotonic() - started >= 0.5
    timer = threading.Timer(0.3, run_to_success, (work, job_id))
    timer.start()
    started = time.monotonic()
    changed = client.get(f"/v1/jobs/{job_id}?wait=20", headers=waiting)
    elapsed = time.monotonic() - started
    timer.join()
    assert changed.status_code == 200
    assert changed.get_json()["state"] in {"running", "succeeded"}
    assert changed.headers["ETag"] != etag
    assert 0.25 < elapsed < 5
    # Without a matching ETag it answers at once.
    assert client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}?wait=61", headers=auth).status_code == 422


def test_a_stream_resumes_from_job_events_when_the_subscription_was_lost(
    client: Any, auth: dict[str, str], engine: Any, redis_client: Any, sessions: Any
) -> None:
    job_id = submit(client, auth)
    with opened(client, f"/v1/jobs/{job_id}/stream", auth) as frames:
        assert frames.next() is not None
        # A transition whose message is lost (this unit publishes nothing, as if Redis had
        # dropped it): the stream hears nothing...
        with Work(engine, None).single_statement() as unit:
            assert claim(unit, uuid.UUID(job_id), "w1", datetime.now(UTC)) is not None
        frames.assert_quiet(0.5)
        # ...until the hub's subscription drops and comes back: then it reads job_events.
        db = redis_client.connection_pool.connection_kwargs.get("db", 0)
        hubs = [
            c["id"]
            for c in redis_client.client_list()
            if c.get("name") == events.HUB_CLIENT and int(c.get("db", -1)) == db
        ]
        assert hubs
        for client_id in hubs:
            redis_client.client_kill_filter(_id=client_id)
        running = frames.next()
    assert running is not None
    assert running["data"]["state"] == "running"
    assert int(running["id"]) == event_ids(sessions, job_id)[1]
