"""The status poll's Redis snapshots: served, refilled from the ledger, isolated, never stale."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import ResponseError
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from bench.roundtrips import watch_redis
from conveyor.jobs import claim_job, succeed_job
from conveyor.retention import prune
from conveyor.settings import Settings
from conveyor.snapshots import (
    BackendResult,
    Snapshot,
    SnapshotReply,
    SnapshotStore,
    queue_read,
    snapshot_key,
)
from tests.factories import job_factory, other_tenant


@pytest.fixture
def store(redis_client: Redis, settings: Settings) -> SnapshotStore:
    """Return a snapshot store on the test Redis."""
    return SnapshotStore(redis_client, settings.result_expires)


@pytest.fixture
def job_reads(app: Any) -> Iterator[list[str]]:
    """Collect the statements the API sends that touch the jobs table."""
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "jobs" in statement:
            statements.append(statement)

    engine = app.extensions["conveyor"].engine
    event.listen(engine, "before_cursor_execute", seen)
    yield statements
    event.remove(engine, "before_cursor_execute", seen)


def submit(client: Any, auth: dict[str, str]) -> str:
    response = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth)
    assert response.status_code == 202
    job_id: str = response.get_json()["id"]
    return job_id


def test_the_poll_is_served_from_the_snapshot_written_at_submit(
    client: Any, auth: dict[str, str], redis_client: Redis, job_reads: list[str]
) -> None:
    job_id = submit(client, auth)
    assert redis_client.hget(snapshot_key(uuid.UUID(job_id)), "doc") is not None
    job_reads.clear()
    response = client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert response.status_code == 200
    assert response.get_json()["state"] == "queued"
    assert job_reads == []


def test_without_a_snapshot_the_ledger_answers_the_same_and_refills_it(
    client: Any, auth: dict[str, str], redis_client: Redis, job_reads: list[str]
) -> None:
    job_id = submit(client, auth)
    from_snapshot = client.get(f"/v1/jobs/{job_id}", headers=auth)
    redis_client.delete(snapshot_key(uuid.UUID(job_id)))
    job_reads.clear()
    from_ledger = client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert len(job_reads) == 1
    assert from_ledger.get_json() == from_snapshot.get_json()
    assert from_ledger.headers["ETag"] == from_snapshot.headers["ETag"]
    job_reads.clear()
    again = client.get(
        f"/v1/jobs/{job_id}", headers={**auth, "If-None-Match": from_ledger.headers["ETag"]}
    )
    assert again.status_code == 304
    assert job_reads == []


def test_another_tenant_never_sees_a_job_through_its_snapshot(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], settings: Settings
) -> None:
    job_id = submit(client, auth)
    other = other_tenant(sessions, settings)
    response = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other.token}"})
    assert response.status_code == 404


def test_an_older_version_never_overwrites_a_newer_one(
    store: SnapshotStore, redis_client: Redis
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()

    def doc(state: str) -> Snapshot:
        return Snapshot(job_id, 0, tenant, json.dumps({"state": state, "started_at": None}))

    def write(version: float, snapshot: Snapshot) -> None:
        store.write([Snapshot(job_id, version, snapshot.tenant_id, snapshot.doc)])

    def state() -> str | None:
        view = store.read(job_id, tenant)
        return None if view is None else str(view["state"])

    write(5, doc("succeeded"))
    write(3, doc("running"))  # a late writer of an earlier transition
    assert state() == "succeeded"
    write(6 - 0.5, Snapshot(job_id, 0))  # a transition with no row at hand: a tombstone
    assert state() is None
    write(5, doc("succeeded"))  # older than the tombstone
    assert state() is None
    write(6, doc("queued"))  # the ledger read after that transition
    assert state() == "queued"
    assert store.read(job_id, uuid.uuid4()) is None  # another tenant
    redis_client.delete(snapshot_key(job_id))


def test_every_transition_moves_the_snapshot_with_the_ledger(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    job_reads: list[str],
) -> None:
    job_id = uuid.UUID(submit(client, auth))

    def poll() -> dict[str, Any]:
        job_reads.clear()
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
        return body

    with sessions.begin() as session:
        claimed = claim_job(session, job_id, "w1", datetime.now(UTC))
    assert claimed is not None
    body = poll()
    assert (body["state"], body["attempts"], job_reads) == ("running", 1, [])
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 202
    body = poll()
    assert body["state"] == "running"
    assert body["cancel_requested_at"] is not None
    with sessions.begin() as session:
        assert succeed_job(session, claimed, {"ok": True}, datetime.now(UTC))
    body = poll()
    assert (body["state"], body["result"], job_reads) == ("succeeded", {"ok": True}, [])


def test_a_cancelled_queued_job_is_never_shown_queued(
    client: Any, auth: dict[str, str], job_reads: list[str]
) -> None:
    job_id = submit(client, auth)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["state"] == "queued"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    job_reads.clear()
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["state"] == "cancelled"
    assert len(job_reads) == 1  # the tombstone sent this poll to the ledger, which refilled it
    job_reads.clear()
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["state"] == "cancelled"
    assert job_reads == []


def test_a_pruned_job_is_gone_from_the_poll(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    job_id = submit(client, auth)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    with sessions.begin() as session:
        later = datetime.now(UTC) + timedelta(days=365)
        counts = prune(
            session, later, job_retention=timedelta(days=1), key_retention=timedelta(days=1)
        )
    assert counts["jobs"] == 1
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 404


def test_an_unreachable_redis_falls_back_to_the_ledger(
    client: Any, auth: dict[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(client, auth)
    # A fresh process (a cold key cache): its limiter reads no snapshot, the dead store does.
    fresh = create_app(settings)
    dead = SnapshotStore(Redis(host="127.0.0.1", port=1, socket_connect_timeout=1), 60)
    monkeypatch.setattr(fresh.extensions["conveyor"], "snapshots", dead)
    response = fresh.test_client().get(f"/v1/jobs/{job_id}", headers=auth)
    fresh.extensions["conveyor"].engine.dispose()
    assert response.status_code == 200
    assert response.get_json()["state"] == "queued"


def test_a_rolled_back_savepoint_leaves_no_snapshot(
    identity: Any, sessions: sessionmaker[Session], redis_client: Redis
) -> None:
    with sessions.begin() as session:
        with contextlib.suppress(RuntimeError), session.begin_nested():
            dropped = job_factory(session, identity.tenant.id).id
            raise RuntimeError
        kept = job_factory(session, identity.tenant.id).id
    assert not redis_client.exists(snapshot_key(dropped))
    assert redis_client.exists(snapshot_key(kept))


def test_writes_that_failed_while_redis_was_away_are_retried(
    store: SnapshotStore, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()
    doc = json.dumps({"state": "queued", "started_at": None})
    store.write([Snapshot(job_id, 1, tenant, doc)])
    away = Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    with monkeypatch.context() as patch:
        patch.setattr(store, "_redis", away)
        succeeded = json.dumps({"state": "succeeded", "started_at": None})
        store.write([Snapshot(job_id, 2, tenant, succeeded)])  # neither written nor dropped
        assert store.read(job_id, tenant) is None  # this process knows: the ledger answers
    # Redis is back with the old snapshot; the next read writes the newer one first, and
    # reads again rather than trust what was read before (the rate limiter's round trip).
    stale = prefetch(redis_client, job_id)
    view = store.read(job_id, tenant, stale)
    assert view is not None
    assert view["state"] == "succeeded"
    redis_client.delete(snapshot_key(job_id))


def prefetch(redis_client: Redis, job_id: uuid.UUID) -> SnapshotReply:
    """Read a job's snapshot as the rate limiter's round trip does, for `SnapshotStore.read`."""
    with redis_client.pipeline(transaction=False) as pipe:
        queue_read(pipe, job_id)
        return SnapshotReply(job_id, pipe.execute(raise_on_error=False))


def test_a_prefetched_snapshot_is_used_as_read_and_checked_as_read(
    store: SnapshotStore, redis_client: Redis
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()
    doc = json.dumps({"state": "queued", "started_at": None})
    store.write([Snapshot(job_id, 1, tenant, doc)])
    reply = prefetch(redis_client, job_id)
    with watch_redis() as sent:
        view = store.read(job_id, tenant, reply)
        assert store.read(job_id, uuid.uuid4(), reply) is None  # another tenant's job
        assert sent["round trips"] == 0
    assert view is not None
    assert view["state"] == "queued"
    assert view["progress"] is None
    # Another job's reply, or one holding an error, is not used: Redis is read again.
    failed = SnapshotReply(job_id, [ResponseError("WRONGTYPE"), None])
    for unusable in (SnapshotReply(uuid.uuid4(), reply.replies), failed):
        with watch_redis() as sent:
            assert store.read(job_id, tenant, unusable) == view
            assert sent["round trips"] == 1
    redis_client.delete(snapshot_key(job_id))


def test_a_write_after_redis_lost_its_scripts_loads_the_script_again(
    store: SnapshotStore, redis_client: Redis
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()
    doc = json.dumps({"state": "queued", "started_at": None})
    # What a Redis restart without persistence of scripts looks like to a running process.
    redis_client.script_flush()
    store.write([Snapshot(job_id, 1, tenant, doc)])
    view = store.read(job_id, tenant)
    assert view is not None
    assert view["state"] == "queued"
    redis_client.delete(snapshot_key(job_id))


def test_a_result_document_goes_out_with_the_snapshots_and_is_announced(
    store: SnapshotStore, redis_client: Redis
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()
    key = f"celery-task-meta-{job_id}"
    listener = redis_client.pubsub()
    listener.subscribe(key)
    assert listener.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    doc = json.dumps({"state": "succeeded", "started_at": None})
    store.write([Snapshot(job_id, 3, tenant, doc), BackendResult(key, b'{"status":"x"}', 120)])
    assert redis_client.get(key) == b'{"status":"x"}'
    assert 0 < redis_client.ttl(key) <= 120
    # Celery's own write PUBLISHes the value too: an AsyncResult.get() waiting hears of it.
    announced = listener.get_message(timeout=5)
    assert announced is not None
    assert announced["data"] == b'{"status":"x"}'
    listener.close()
    view = store.read(job_id, tenant)
    assert view is not None
    assert view["state"] == "succeeded"
    redis_client.delete(key, snapshot_key(job_id))


def test_a_result_document_lost_with_redis_is_dropped_but_its_snapshot_is_retried(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()
    away = Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    monkeypatch.setattr(store, "_redis", away)
    snapshot = Snapshot(job_id, 2, tenant, json.dumps({"state": "succeeded"}))
    store.write([snapshot, BackendResult(f"celery-task-meta-{job_id}", b"{}", 60)])
    # The ledger has the result; only the snapshot must never be served stale.
    assert store._retries == [snapshot]


def test_a_batch_answers_byte_for_byte_what_the_snapshot_and_the_ledger_answer(
    client: Any, auth: dict[str, str], redis_client: Redis
) -> None:
    # A client's own offset: the ledger answers in UTC, and so must the submit.
    run_at = (datetime.now(UTC) + timedelta(hours=1)).astimezone(timezone(timedelta(hours=2)))
    jobs = [
        {"type": "system.noop"},
        {
            "type": "system.sleep",
            "payload": {"seconds": 1},
            "priority": 7,
            "tags": ["a", "b:c"],
            "metadata": {"nested": {"list": [1, 2.5, None, "x"]}},
            "ttl_seconds": 3600,
        },
        {"type": "system.noop", "run_at": run_at.isoformat(), "max_attempts": 4},
    ]
    response = client.post("/v1/jobs/batch", json={"jobs": jobs}, headers=auth)
    assert response.status_code == 202
    for item in response.get_json()["items"]:
        answer = client.application.json.response(item)
        answer.add_etag()
        path = f"/v1/jobs/{item['id']}"
        from_snapshot = client.get(path, headers=auth)
        redis_client.delete(snapshot_key(uuid.UUID(item["id"])))
        from_ledger = client.get(path, headers=auth)
        assert from_snapshot.data == from_ledger.data == answer.get_data()
        assert (
            from_snapshot.headers["ETag"] == from_ledger.headers["ETag"] == answer.headers["ETag"]
        )
