"""Submit options, batches, idempotency, listing and ETags over HTTP (no worker needed)."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time
from redis import Redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.broker.inspect import queue_depth
from conveyor.ledger.dispatch import dispatch
from conveyor.ledger.transitions import claim
from conveyor.ledger.upkeep import expire_due, promote_due, stop_overdue
from conveyor.ledger.work import UnitOfWork, Work
from conveyor.models import IdempotencyKey, Job
from conveyor.retention import prune
from conveyor.settings import Settings
from tests.test_api import assert_problem
from tests.test_jobs import events


def count_jobs(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def iso(moment: datetime) -> str:
    return moment.isoformat()


def test_every_option_is_stored_and_shown(
    client: Any, auth: dict[str, str], settings: Settings
) -> None:
    expires = datetime.now(UTC) + timedelta(hours=2)
    body = {
        "type": "system.noop",
        "priority": 7,
        "queue": settings.default_queue,
        "expires_at": iso(expires),
        "max_attempts": 4,
        "tags": ["billing", "eu-west"],
        "metadata": {"order": 42},
    }
    job = client.post("/v1/jobs", json=body, headers=auth).get_json()
    assert "priority" in job, job
    assert (job["priority"], job["queue"], job["max_attempts"]) == (7, settings.default_queue, 4)
    assert job["tags"] == ["billing", "eu-west"]
    assert job["metadata"] == {"order": 42}
    assert datetime.fromisoformat(job["expires_at"]) == expires
    assert job["state"] == "queued"


def test_a_delayed_job_waits_unpublished_until_due(
    client: Any,
    auth: dict[str, str],
    work: Work,
    redis_client: Redis,
    settings: Settings,
) -> None:
    before = queue_depth(redis_client, settings.default_queue)
    with freeze_time(datetime.now(UTC)) as frozen:
        job = client.post(
            "/v1/jobs", json={"type": "system.noop", "delay_seconds": 60}, headers=auth
        ).get_json()
        assert job["state"] == "scheduled"
        assert queue_depth(redis_client, settings.default_queue) == before
        with work.begin() as unit:
            assert promote_due(unit, datetime.now(UTC)) == 0
        frozen.tick(timedelta(seconds=61))
        with work.begin() as unit:
            assert promote_due(unit, datetime.now(UTC)) == 1
            assert unit.messages == []  # queued for the dispatcher, which publishes it
            queue = settings.default_queue
            passed = dispatch(unit, datetime.now(UTC), rooms={queue: 10}, per_tenant=10, after={})
            assert passed.published == 1
            assert [m.job_id for m in unit.messages] == [uuid.UUID(job["id"])]
        assert queue_depth(redis_client, settings.default_queue) == before + 1


def test_ttl_expires_a_job_that_never_started(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], work: Work
) -> None:
    with freeze_time(datetime.now(UTC)) as frozen:
        job = client.post(
            "/v1/jobs", json={"type": "system.noop", "ttl_seconds": 30}, headers=auth
        ).get_json()
        job_id = uuid.UUID(job["id"])
        frozen.tick(timedelta(seconds=31))
        now = datetime.now(UTC)
        with work.begin() as unit:
            assert claim(unit, job_id, "w1", now) is None  # too late to start
            assert expire_due(unit, now) == 1
        with sessions() as session:
            assert session.get_one(Job, job_id).state == "expired"
            assert events(session, session.get_one(Job, job_id))[-1][1] == "expired"


def test_retention_prunes_old_finished_jobs_and_keys(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], work: Work
) -> None:
    headers = {**auth, "Idempotency-Key": "old-key"}
    old = client.post("/v1/jobs", json={"type": "system.noop"}, headers=headers).get_json()
    young = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).get_json()
    now = datetime.now(UTC)
    with sessions.begin() as session:
        for job_id, finished in ((old["id"], now - timedelta(days=31)), (young["id"], now)):
            job = session.get_one(Job, uuid.UUID(job_id))
            job.state, job.finished_at = "succeeded", finished
        session.get_one(IdempotencyKey, (job.tenant_id, "old-key")).created_at = now - timedelta(
            hours=25
        )
    with work.begin() as unit:
        counts = prune(
            unit, now, job_retention=timedelta(days=30), key_retention=timedelta(hours=24)
        )
    assert counts["jobs"] == 1
    assert counts["idempotency_keys"] == 1
    with sessions() as session:
        assert session.get(Job, uuid.UUID(old["id"])) is None
        assert session.get(Job, uuid.UUID(young["id"])) is not None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "system.noop", "queue": "elsewhere"}, "queue"),
        ({"type": "system.noop", "priority": 10}, "priority"),
        ({"type": "system.noop", "priority": -1}, "priority"),
        ({"type": "system.noop", "run_at": "2020-01-01T00:00:00Z"}, "body"),
        ({"type": "system.noop", "run_at": "2999-01-01T00:00:00Z"}, "body"),
        ({"type": "system.noop", "run_at": "2030-01-01T00:00:00"}, "run_at"),
        ({"type": "system.noop", "delay_seconds": 5, "run_at": "2030-01-01T00:00:00Z"}, "body"),
        ({"type": "system.noop", "ttl_seconds": 5, "expires_at": "2030-01-01T00:00:00Z"}, "body"),
        ({"type": "system.noop", "tags": ["t"] * 11}, "tags"),
        ({"type": "system.noop", "tags": ["x" * 65]}, "tags.0"),
        ({"type": "system.noop", "tags": ["has space"]}, "tags.0"),
        ({"type": "system.noop", "metadata": {"blob": "x" * 5000}}, "metadata"),
        ({"type": "system.noop", "max_attempts": 0}, "max_attempts"),
        ({"type": "system.noop", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    ],
)
def test_bad_options_are_422_and_write_nothing(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    redis_client: Redis,
    settings: Settings,
    body: dict[str, Any],
    field: str,
) -> None:
    before = queue_depth(redis_client, settings.default_queue)
    problem = assert_problem(client.post("/v1/jobs", json=body, headers=auth), 422)
    assert field in [e["field"] for e in problem["errors"]], problem
    assert count_jobs(sessions) == 0
    assert queue_depth(redis_client, settings.default_queue) == before


def test_a_batch_is_all_or_nothing(
    make_app: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    redis_client: Redis,
    settings: Settings,
) -> None:
    # Room in the broker for the whole batch: this test is about all or nothing, not turns.
    client = make_app(dispatch_in_flight=10_000).test_client()
    before = queue_depth(redis_client, settings.default_queue)
    good = {"type": "system.noop"}
    bad = {"type": "system.sleep", "payload": {"seconds": -1}}
    problem = assert_problem(
        client.post("/v1/jobs/batch", json={"jobs": [good, bad, good]}, headers=auth), 422
    )
    assert problem["errors"][0]["field"] == "jobs[1].payload.seconds"
    assert count_jobs(sessions) == 0
    too_many = client.post("/v1/jobs/batch", json={"jobs": [good] * 1001}, headers=auth)
    assert "jobs" in [e["field"] for e in assert_problem(too_many, 422)["errors"]]
    assert count_jobs(sessions) == 0
    assert queue_depth(redis_client, settings.default_queue) == before
    accepted = client.post(
        "/v1/jobs/batch",
        json={"jobs": [good] * 250 + [{**good, "delay_seconds": 60}]},
        headers=auth,
    )
    assert accepted.status_code == 202
    states = [j["state"] for j in accepted.get_json()["items"]]
    assert states.count("queued") == 250
    assert states.count("scheduled") == 1
    assert count_jobs(sessions) == 251
    assert queue_depth(redis_client, settings.default_queue) == before + 250
    redis_client.delete(f"{settings.default_queue}:9")


def test_idempotency_key_returns_the_original_or_conflicts(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    headers = {**auth, "Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json={"type": "system.noop"}, headers=headers)
    again = client.post("/v1/jobs", json={"type": "system.noop"}, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.get_json()["id"] == again.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    other = client.post("/v1/jobs", json={"type": "system.noop", "priority": 3}, headers=headers)
    assert_problem(other, 409)
    long_key = {**auth, "Idempotency-Key": "k" * 256}
    assert_problem(client.post("/v1/jobs", json={"type": "system.noop"}, headers=long_key), 422)
    assert count_jobs(sessions) == 1


def test_concurrent_submits_with_one_key_create_one_job(
    settings: Settings, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    app = create_app(settings)
    barrier = threading.Barrier(8)
    statuses: list[int] = []

    def submit() -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post(
            "/v1/jobs",
            json={"type": "system.noop"},
            headers={**auth, "Idempotency-Key": "race"},
        )
        statuses.append(response.status_code)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    app.extensions["conveyor"].engine.dispose()
    assert sorted(statuses) == [200] * 7 + [202]
    assert count_jobs(sessions) == 1


def test_pagination_is_stable_under_concurrent_inserts(client: Any, auth: dict[str, str]) -> None:
    submitted = [
        client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).get_json()["id"]
        for _ in range(25)
    ]
    seen: list[str] = []
    url = "/v1/jobs?limit=10"
    while url:
        page = client.get(url, headers=auth).get_json()
        seen += [job["id"] for job in page["items"]]
        # New jobs arrive between pages; they are newer than every page already read.
        client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth)
        url = page["links"].get("next")
    assert len(seen) == len(set(seen))
    assert seen == list(reversed(submitted))


def test_list_filters(client: Any, auth: dict[str, str], settings: Settings) -> None:
    tagged = client.post(
        "/v1/jobs", json={"type": "system.noop", "tags": ["vip"]}, headers=auth
    ).get_json()
    client.post("/v1/jobs", json={"type": "system.sleep", "payload": {"seconds": 1}}, headers=auth)
    client.post("/v1/jobs", json={"type": "system.noop", "delay_seconds": 60}, headers=auth)

    def ids(query: str) -> list[str]:
        return [j["id"] for j in client.get(f"/v1/jobs?{query}", headers=auth).get_json()["items"]]

    assert ids("tag=vip") == [tagged["id"]]
    assert len(ids("type=system.noop")) == 2
    assert len(ids("state=scheduled")) == 1
    assert len(ids(f"queue={settings.default_queue}")) == 3
    assert ids("queue=elsewhere") == []
    after = tagged["created_at"].replace("+00:00", "Z")
    assert tagged["id"] not in ids(f"created_after={after}")
    assert ids(f"created_before={after}") == []
    assert_problem(client.get("/v1/jobs?state=bogus", headers=auth), 422)
    assert_problem(client.get("/v1/jobs?limit=201", headers=auth), 422)
    assert_problem(client.get("/v1/jobs?cursor=%%%", headers=auth), 422)
    assert_problem(client.get("/v1/jobs?color=red", headers=auth), 422)


def test_etag_and_304(client: Any, auth: dict[str, str]) -> None:
    job = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).get_json()
    first = client.get(f"/v1/jobs/{job['id']}", headers=auth)
    etag = first.headers["ETag"]
    unchanged = client.get(f"/v1/jobs/{job['id']}", headers={**auth, "If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.get_data() == b""
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    changed = client.get(f"/v1/jobs/{job['id']}", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.get_json()["state"] == "cancelled"


def test_job_types_list_their_schemas(
    client: Any, auth: dict[str, str], settings: Settings
) -> None:
    types = {t["name"]: t for t in client.get("/v1/job-types", headers=auth).get_json()["items"]}
    assert {"system.noop", "system.sleep", "system.fail"} <= set(types)
    sleep = types["system.sleep"]
    assert sleep["payload_schema"]["properties"]["seconds"]["maximum"] == 3600
    assert sleep["result_schema"]["properties"]["slept"]["type"] == "number"
    assert sleep["queues"] == [settings.default_queue]


def test_cancel_and_retry_in_the_wrong_state_are_409(client: Any, auth: dict[str, str]) -> None:
    job = client.post(
        "/v1/jobs", json={"type": "system.noop", "delay_seconds": 60}, headers=auth
    ).get_json()
    assert_problem(client.post(f"/v1/jobs/{job['id']}/retry", headers=auth), 409)
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200
    assert cancelled.get_json()["outcome"] == "cancelled"
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth), 409)
    history = client.get(f"/v1/jobs/{job['id']}/events", headers=auth).get_json()["items"]
    assert [(e["from_state"], e["to_state"]) for e in history] == [
        (None, "scheduled"),
        ("scheduled", "cancelled"),
    ]
    retried = client.post(f"/v1/jobs/{job['id']}/retry", headers=auth)
    assert retried.status_code == 202
    assert retried.get_json()["state"] == "queued"
    bulk = client.post("/v1/jobs/retry", json={"state": "running"}, headers=auth)
    assert_problem(bulk, 409)


def test_priorities_land_in_kombu_priority_lists(
    client: Any, auth: dict[str, str], redis_client: Redis, settings: Settings
) -> None:
    queue = settings.default_queue
    before = {name: redis_client.llen(name) for name in (queue, f"{queue}:4", f"{queue}:9")}
    for priority in (9, 5, 0):
        client.post("/v1/jobs", json={"type": "system.noop", "priority": priority}, headers=auth)
    # Redis reads list `queue` (kombu level 0) first: Conveyor's 9 goes there.
    assert redis_client.llen(queue) == before[queue] + 1
    assert redis_client.llen(f"{queue}:4") == before[f"{queue}:4"] + 1
    assert redis_client.llen(f"{queue}:9") == before[f"{queue}:9"] + 1
    redis_client.delete(queue, f"{queue}:4", f"{queue}:9")


def test_workers_drain_queues_in_the_configured_order(settings: Settings) -> None:
    from worker.app import consumed_queues, create_celery_app

    ordered = settings.model_copy(
        update={"queue_order": ["critical", settings.default_queue, "low"]}
    )
    app = create_celery_app(ordered)
    try:
        assert consumed_queues(ordered, app.conveyor) == [settings.default_queue]
        assert [q.name for q in app.conf.task_queues] == [settings.default_queue]
        transport = app.conf.broker_transport_options
        assert transport["queue_order_strategy"] == "priority"
    finally:
        app.conveyor.engine.dispose()


def test_overdue_cancellations_are_cancelled_for_termination(
    db_session: Session, unit: UnitOfWork
) -> None:
    from tests.factories import job_factory

    stubborn, polite = job_factory(db_session), job_factory(db_session)
    now = datetime.now(UTC)
    for job in (stubborn, polite):
        claim(unit, job.id, "w1", now)
    stubborn.cancel_requested_at = now - timedelta(seconds=31)
    polite.cancel_requested_at = now - timedelta(seconds=5)
    db_session.flush()
    assert stop_overdue(unit, now, grace=30) == [stubborn.id]
    db_session.refresh(stubborn)
    db_session.refresh(polite)
    assert (stubborn.state, polite.state) == ("cancelled", "running")
    assert "terminated" in events_detail(db_session, stubborn)


def events_detail(session: Session, job: Job) -> str:
    from conveyor.models import JobEvent

    rows = session.scalars(select(JobEvent.detail).where(JobEvent.job_id == job.id))
    return " ".join(str(r) for r in rows)
