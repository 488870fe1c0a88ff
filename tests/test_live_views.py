"""The poll's live views in Redis: served, refilled from the ledger, isolated, never stale."""

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
from api.jobs import etag_of
from bench.roundtrips import watch_redis
from conveyor.ledger.requests import JobRequest
from conveyor.ledger.submit import submit_jobs
from conveyor.ledger.transitions import claim, succeed
from conveyor.ledger.upkeep import beat_heartbeats
from conveyor.ledger.work import Work
from conveyor.live.store import (
    LiveStore,
    LiveView,
    Prefetched,
    progress_document,
    queue_read,
    view_key,
)
from conveyor.registry import load_job_types
from conveyor.retention import prune
from conveyor.settings import Settings
from tests.factories import other_tenant


@pytest.fixture
def store(redis_client: Redis, settings: Settings) -> LiveStore:
    """Return a live store on the test Redis."""
    return LiveStore(redis_client, settings.result_expires)


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


def test_the_poll_is_served_from_the_view_written_at_submit(
    client: Any, auth: dict[str, str], redis_client: Redis, job_reads: list[str]
) -> None:
    job_id = submit(client, auth)
    assert redis_client.hget(view_key(uuid.UUID(job_id)), "doc") is not None
    job_reads.clear()
    response = client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert response.status_code == 200
    assert response.get_json()["state"] == "queued"
    assert job_reads == []


def test_without_a_view_the_ledger_answers_the_same_and_refills_it(
    client: Any, auth: dict[str, str], redis_client: Redis, job_reads: list[str]
) -> None:
    job_id = submit(client, auth)
    from_view = client.get(f"/v1/jobs/{job_id}", headers=auth)
    redis_client.delete(view_key(uuid.UUID(job_id)))
    job_reads.clear()
    from_ledger = client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert len(job_reads) == 1
    assert from_ledger.get_json() == from_view.get_json()
    assert from_ledger.headers["ETag"] == from_view.headers["ETag"]
    job_reads.clear()
    again = client.get(
        f"/v1/jobs/{job_id}", headers={**auth, "If-None-Match": from_ledger.headers["ETag"]}
    )
    assert again.status_code == 304
    assert job_reads == []


def test_another_tenant_never_sees_a_job_through_its_view(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], settings: Settings
) -> None:
    job_id = submit(client, auth)
    other = other_tenant(sessions, settings)
    response = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other.token}"})
    assert response.status_code == 404


def test_an_older_version_never_overwrites_a_newer_one(
    store: LiveStore, redis_client: Redis
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()

    def write(version: int, state: str | None) -> None:
        doc = None if state is None else json.dumps({"state": state, "started_at": None})
        store.write([LiveView(job_id, version, tenant, doc)])

    def state() -> str | None:
        found = store.read(job_id, tenant)
        return None if found is None else str(found.view["state"])

    write(5, "succeeded")
    write(3, "running")  # a late writer of an earlier transition
    assert state() == "succeeded"
    write(6, None)  # a change written without its view: a tombstone
    assert state() is None
    write(5, "succeeded")  # older than the tombstone
    assert state() is None
    write(6, "queued")  # the ledger read after that change, at the same version
    assert state() == "queued"
    assert store.read(job_id, uuid.uuid4()) is None  # another tenant
    redis_client.delete(view_key(job_id))


def test_every_transition_moves_the_view_with_the_ledger(
    client: Any,
    auth: dict[str, str],
    work: Work,
    job_reads: list[str],
) -> None:
    job_id = uuid.UUID(submit(client, auth))

    def poll() -> dict[str, Any]:
        job_reads.clear()
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
        return body

    with work.single_statement() as unit:
        claimed = claim(unit, job_id, "w1", datetime.now(UTC))
    assert claimed is not None
    # Not shown until a durable write names the claim (the worker's first heartbeat).
    assert (poll()["state"], job_reads) == ("queued", [])
    with work.single_statement() as unit:
        beat_heartbeats(unit, [claimed], datetime.now(UTC))
    body = poll()
    assert (body["state"], body["attempts"], job_reads) == ("running", 1, [])
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 202
    body = poll()
    assert (body["state"], job_reads) == ("running", [])
    assert body["cancel_requested_at"] is not None
    with work.begin() as unit:
        assert succeed(unit, claimed, {"ok": True}, datetime.now(UTC))
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
    assert job_reads == []  # the cancel wrote the view it made


def test_a_pruned_job_is_gone_from_the_poll(client: Any, auth: dict[str, str], work: Work) -> None:
    job_id = submit(client, auth)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    with work.begin() as unit:
        later = datetime.now(UTC) + timedelta(days=365)
        counts = prune(
            unit, later, job_retention=timedelta(days=1), key_retention=timedelta(days=1)
        )
    assert counts["jobs"] == 1
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 404


def test_an_unreachable_redis_falls_back_to_the_ledger(
    client: Any, auth: dict[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(client, auth)
    # A fresh process (a cold key cache): its limiter reads no snapshot, the dead store does.
    fresh = create_app(settings)
    services = fresh.extensions["conveyor"]
    dead = LiveStore(Redis(host="127.0.0.1", port=1, socket_connect_timeout=1), 60)
    monkeypatch.setattr(services, "work", Work(services.engine, dead, services.publisher))
    response = fresh.test_client().get(f"/v1/jobs/{job_id}", headers=auth)
    fresh.extensions["conveyor"].engine.dispose()
    assert response.status_code == 200
    assert response.get_json()["state"] == "queued"


def test_a_rolled_back_savepoint_leaves_no_view_and_no_message(
    identity: Any, work: Work, redis_client: Redis
) -> None:
    registry = load_job_types(["conveyor.jobtypes.system"])

    def submit_one(unit: Any) -> uuid.UUID:
        (job,) = submit_jobs(
            unit,
            registry,
            [JobRequest(type="system.noop", delay_seconds=60)],
            tenant_id=identity.tenant.id,
            default_queue="q",
            now=datetime.now(UTC),
        )
        return job.id

    with work.begin() as unit:
        with contextlib.suppress(RuntimeError), unit.savepoint():
            dropped = submit_one(unit)
            raise RuntimeError
        kept = submit_one(unit)
        assert [view.job_id for view in unit.views] == [kept]
    assert not redis_client.exists(view_key(dropped))
    assert redis_client.exists(view_key(kept))


def test_writes_that_failed_while_redis_was_away_are_retried(
    store: LiveStore, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()
    doc = json.dumps({"state": "queued", "started_at": None})
    store.write([LiveView(job_id, 1, tenant, doc)])
    away = Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    with monkeypatch.context() as patch:
        patch.setattr(store, "_redis", away)
        succeeded = json.dumps({"state": "succeeded", "started_at": None})
        store.write([LiveView(job_id, 2, tenant, succeeded)])  # neither written nor dropped
        assert store.read(job_id, tenant) is None  # this process knows: the ledger answers
    # Redis is back with the old view; the next read writes the newer one first, and
    # reads again rather than trust what was read before (the rate limiter's round trip).
    stale = prefetch(redis_client, job_id)
    found = store.read(job_id, tenant, stale)
    assert found is not None
    assert found.view["state"] == "succeeded"
    redis_client.delete(view_key(job_id))


def prefetch(redis_client: Redis, job_id: uuid.UUID) -> Prefetched:
    """Read a job's view as the rate limiter's round trip does, for `LiveStore.read`."""
    with redis_client.pipeline(transaction=False) as pipe:
        queue_read(pipe, job_id)
        return Prefetched(job_id, pipe.execute(raise_on_error=False))


def test_a_prefetched_view_is_used_as_read_and_checked_as_read(
    store: LiveStore, redis_client: Redis
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()
    doc = json.dumps({"state": "running", "started_at": None})
    store.write([LiveView(job_id, 1, tenant, doc)])
    store.set_progress(job_id, progress_document(3, 4, "three"))
    reply = prefetch(redis_client, job_id)
    with watch_redis() as sent:
        view = store.read(job_id, tenant, reply)
        assert store.read(job_id, uuid.uuid4(), reply) is None  # another tenant's job
        assert sent["round trips"] == 0
    assert view is not None
    assert view.view["state"] == "running"
    assert view.progress == {"current": 3, "total": 4, "percent": 75.0, "message": "three"}
    # Another job's reply, or one holding an error, is not used: Redis is read again.
    failed = Prefetched(job_id, [ResponseError("WRONGTYPE"), None])
    for unusable in (Prefetched(uuid.uuid4(), reply.replies), failed):
        with watch_redis() as sent:
            assert store.read(job_id, tenant, unusable) == view
            assert sent["round trips"] == 1
    redis_client.delete(view_key(job_id), f"conveyor:progress:{job_id}")


def test_a_write_after_redis_lost_its_scripts_loads_the_script_again(
    store: LiveStore, redis_client: Redis
) -> None:
    tenant, job_id = uuid.uuid4(), uuid.uuid4()
    doc = json.dumps({"state": "queued", "started_at": None})
    # What a Redis restart without persistence of scripts looks like to a running process.
    redis_client.script_flush()
    store.write([LiveView(job_id, 1, tenant, doc)])
    found = store.read(job_id, tenant)
    assert found is not None
    assert found.view["state"] == "queued"
    redis_client.delete(view_key(job_id))


def test_a_batch_answers_byte_for_byte_what_the_view_and_the_ledger_answer(
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
        answer.set_etag(etag_of(item))
        path = f"/v1/jobs/{item['id']}"
        from_view = client.get(path, headers=auth)
        redis_client.delete(view_key(uuid.UUID(item["id"])))
        from_ledger = client.get(path, headers=auth)
        assert from_view.data == from_ledger.data == answer.get_data()
        assert from_view.headers["ETag"] == from_ledger.headers["ETag"] == answer.headers["ETag"]
