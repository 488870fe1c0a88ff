"""Live status (issue #20): job and tenant event streams, resume, walls, the long poll.

Against the real API app, PostgreSQL and Redis: transitions are committed through the
ledger's units of work, and every change reaches the streams through Redis pub/sub.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import streams
from conveyor.ledger.transitions import claim
from conveyor.ledger.upkeep import beat_heartbeats
from conveyor.ledger.work import Work
from conveyor.live import events
from conveyor.live.store import LiveStore
from conveyor.models import JobEvent
from conveyor.settings import Settings
from tests.factories import other_tenant
from tests.sse import opened, run_to_success


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


def test_a_transition_committed_while_a_stream_catches_up_is_still_sent(
    client: Any, auth: dict[str, str], work: Work, sessions: Any, monkeypatch: Any
) -> None:
    job_id = submit(client, auth)
    (queued,) = event_ids(sessions, job_id)
    read_events = streams.job_events_after

    def then_a_claim_commits(*args: Any, **kwargs: Any) -> Any:
        # The catch-up has read the events; the job moves on before it reads the job's row.
        found = read_events(*args, **kwargs)
        if len(event_ids(sessions, job_id)) == 1:
            with work.single_statement() as unit:
                claimed = claim(unit, uuid.UUID(job_id), "w1", datetime.now(UTC))
            assert claimed is not None
            # The claim's view is shown once the claim is durable: its first heartbeat.
            with work.single_statement() as unit:
                beat_heartbeats(unit, [claimed], datetime.now(UTC))
        return found

    monkeypatch.setattr(streams, "job_events_after", then_a_claim_commits)
    with opened(
        client, f"/v1/jobs/{job_id}/stream", {**auth, "Last-Event-ID": str(queued)}
    ) as frames:
        running = frames.next()
    assert running is not None
    assert (int(running["id"]), running["data"]["state"]) == (
        event_ids(sessions, job_id)[1],
        "running",
    )


def test_the_first_subscribers_of_a_new_hub_are_not_sent_back_to_the_ledger(
    redis_client: Any,
) -> None:
    # They read the ledger after the hub listens: nothing can have been missed before.
    # (A subscriber that had read it when the subscription dropped is sent back: the test
    # of a lost subscription above.)
    hub = events.Hub(redis_client)
    with (
        hub.subscribe(job_id=uuid.uuid4()) as first,
        hub.subscribe(tenant_id=uuid.uuid4()) as second,
    ):
        assert hub.listening
        time.sleep(0.3)
        assert (first.behind, second.behind) == (False, False)
    hub.close()


def test_a_hub_outlives_any_failure_of_its_subscription(
    redis_client: Any, monkeypatch: Any
) -> None:
    hub = events.Hub(redis_client, retry_seconds=0.05)
    listen = hub._listen
    failures = [ValueError("I/O operation on closed file.")]  # redis-py's, not a RedisError

    def fails_once() -> None:
        if failures:
            raise failures.pop()
        listen()

    monkeypatch.setattr(hub, "_listen", fails_once)
    with hub.subscribe(job_id=uuid.uuid4()):
        assert hub.listening
    assert not failures
    hub.close()
