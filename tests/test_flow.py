"""Flow control on real PostgreSQL and Redis: limits, pauses, unique jobs, turns across tenants.

The claims here are the worker's own (`run_job`), called in-process so each test decides
when a job starts; the dispatcher passes are its own too (`Dispatcher.run_once`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from redis import Redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_lists
from conveyor.ledger.gate import BUSY_KEY
from conveyor.ledger.states import JobState
from conveyor.models import AuditEntry, Job, Limit
from conveyor.settings import Settings
from tests.conftest import bearer
from tests.factories import other_tenant
from worker.app import create_celery_app
from worker.dispatcher import Dispatcher
from worker.runner import run_job

NOOP = {"type": "system.noop"}


@pytest.fixture
def worker_app(settings: Settings, redis_client: Redis) -> Iterator[Any]:
    """Yield the worker's app (no worker runs: tests claim and run jobs themselves)."""
    # An earlier test's messages (no worker consumed them) would fill the queue's room.
    redis_client.delete(*queue_lists(settings.default_queue))
    app = create_celery_app(settings.model_copy(update={"heartbeat_interval": 3600}))
    yield app
    app.conveyor.engine.dispose()
    redis_client.delete(*queue_lists(settings.default_queue))


@pytest.fixture
def dispatcher(worker_app: Any) -> Dispatcher:
    """Return a dispatcher on the test servers (its passes run when a test says)."""
    return Dispatcher.for_app(worker_app)


def submit(client: Any, auth: dict[str, str], **options: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={**NOOP, **options}, headers=auth)
    assert response.status_code in (200, 202), response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def rows(sessions: sessionmaker[Session], ids: list[str]) -> dict[str, Job]:
    with sessions() as session:
        found = session.scalars(select(Job).where(Job.id.in_([uuid.UUID(i) for i in ids])))
        return {str(job.id): job for job in found}


def published(sessions: sessionmaker[Session], ids: list[str]) -> set[str]:
    return {i for i, job in rows(sessions, ids).items() if job.published_at is not None}


def test_a_limit_holds_jobs_in_the_ledger_and_the_dispatcher_fills_its_slots(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
    worker_app: Any,
) -> None:
    put = client.put("/v1/limits/stripe", json={"max_running": 2}, headers=auth)
    assert put.status_code == 200, put.get_json()
    assert put.get_json()["running"] == 0
    jobs = [submit(client, auth, limit_key="stripe") for _ in range(5)]
    ids = [job["id"] for job in jobs]
    assert {job["waiting_for"] for job in jobs} == {"limit"}
    assert published(sessions, ids) == set()  # nothing went to the broker at submit
    assert dispatcher.run_once().published == 2
    first = published(sessions, ids)
    assert len(first) == 2
    assert dispatcher.run_once().published == 0  # both slots are taken by jobs in flight
    # A job holding a slot runs (and finishes: a no-op); its slot comes back for the next.
    services = worker_app.conveyor
    done = sorted(first)[0]
    assert run_job(services, done) == "succeeded"
    assert dispatcher.run_once().published == 1
    limit = client.get("/v1/limits/stripe", headers=auth).get_json()
    assert (limit["running"], limit["waiting"]) == (0, 4)
    views = {
        job["id"]: client.get(f"/v1/jobs/{job['id']}", headers=auth).get_json() for job in jobs
    }
    assert sum(v["waiting_for"] == "limit" for v in views.values()) == 2


def test_the_claim_holds_the_limit_even_when_more_are_published(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    worker_app: Any,
) -> None:
    assert client.put("/v1/limits/db", json={"max_running": 1}, headers=auth).status_code == 200
    ids = [submit(client, auth, limit_key="db", payload={})["id"] for _ in range(2)]
    # As if two dispatchers overlapped, or a message was duplicated: both are in the broker.
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_([uuid.UUID(i) for i in ids]))
            .values(published_at=func.now())
        )
    services = worker_app.conveyor
    with services.work.single_statement() as unit:
        from conveyor.ledger.transitions import claim

        first = claim(unit, uuid.UUID(ids[0]), "w1", datetime.now(UTC))
    assert first is not None
    assert run_job(services, ids[1]) == "skipped"  # no room: sent back to wait
    second = rows(sessions, [ids[1]])[ids[1]]
    assert (second.state, second.attempt, second.published_at) == ("queued", 0, None)
    assert second.waiting_for == "limit"
    with sessions() as session:
        running = session.scalar(select(Limit.running).where(Limit.key == "db"))
    assert running == 1


def test_a_rate_spaces_starts(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], worker_app: Any
) -> None:
    assert client.put("/v1/limits/api", json={"per_second": 2}, headers=auth).status_code == 200
    ids = [submit(client, auth, limit_key="api")["id"] for _ in range(3)]
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_([uuid.UUID(i) for i in ids]))
            .values(published_at=func.now())
        )
    outcomes = [run_job(worker_app.conveyor, i) for i in ids]
    # A burst up to the rate, then the window is full: the third waits.
    assert outcomes == ["succeeded", "succeeded", "skipped"]
    assert rows(sessions, [ids[2]])[ids[2]].waiting_for == "limit"


def test_a_paused_queue_holds_its_jobs_until_resumed(
    client: Any,
    auth: dict[str, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
    worker_app: Any,
) -> None:
    queue = settings.default_queue
    paused = client.post(f"/v1/queues/{queue}/pause", headers=auth)
    assert paused.get_json() == {"queue": queue, "paused": True}
    # The API's view of pauses is at most a moment old: wait that moment out.
    client.application.extensions["conveyor"].gate._checked = -float("inf")
    job = submit(client, auth)
    assert job["waiting_for"] == "pause"
    dispatcher.run_once()
    assert published(sessions, [job["id"]]) == set()
    listed = {q["name"]: q for q in client.get("/v1/queues", headers=auth).get_json()["queues"]}
    assert listed[queue]["paused"] is True
    resumed = client.post(f"/v1/queues/{queue}/resume", headers=auth)
    assert resumed.get_json() == {"queue": queue, "paused": False}
    assert dispatcher.run_once().published == 1
    assert run_job(worker_app.conveyor, job["id"]) == "succeeded"
    with sessions() as session:
        actions = session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)).all()
    assert [a for a in actions if a.startswith("queue.")] == ["queue.pause", "queue.resume"]


def test_a_job_published_into_a_pause_goes_back_to_wait(
    client: Any,
    auth: dict[str, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    worker_app: Any,
) -> None:
    job = submit(client, auth)  # published at once: the queue is open
    assert published(sessions, [job["id"]]) == {job["id"]}
    client.post(f"/v1/queues/{settings.default_queue}/pause", headers=auth)
    assert run_job(worker_app.conveyor, job["id"]) == "skipped"
    row = rows(sessions, [job["id"]])[job["id"]]
    assert (row.state, row.attempt, row.waiting_for, row.published_at) == (
        "queued",
        0,
        "pause",
        None,
    )


def test_a_unique_key_answers_with_the_job_that_holds_it(
    client: Any, auth: dict[str, str], worker_app: Any
) -> None:
    first = client.post("/v1/jobs", json={**NOOP, "unique_key": "nightly"}, headers=auth)
    again = client.post("/v1/jobs", json={**NOOP, "unique_key": "nightly"}, headers=auth)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"].endswith(first.get_json()["id"])
    # Another type's key, or another key, is another job.
    other = client.post(
        "/v1/jobs",
        json={"type": "system.sleep", "payload": {"seconds": 0}, "unique_key": "nightly"},
        headers=auth,
    )
    assert other.status_code == 202
    # Once its job has finished, the key is free.
    assert run_job(worker_app.conveyor, first.get_json()["id"]) == "succeeded"
    after = client.post("/v1/jobs", json={**NOOP, "unique_key": "nightly"}, headers=auth)
    assert after.status_code == 202
    assert after.get_json()["id"] != first.get_json()["id"]


def test_a_unique_window_holds_the_key_after_its_job_finished(
    client: Any, auth: dict[str, str], worker_app: Any
) -> None:
    body = {**NOOP, "unique_key": "hourly", "unique_for_seconds": 3600}
    first = client.post("/v1/jobs", json=body, headers=auth).get_json()
    assert run_job(worker_app.conveyor, first["id"]) == "succeeded"
    again = client.post("/v1/jobs", json=body, headers=auth)
    assert again.status_code == 200
    assert again.get_json()["id"] == first["id"]
    assert again.get_json()["state"] == "succeeded"


def test_one_tenants_backlog_does_not_hold_another_tenants_jobs_back(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    dispatcher: Dispatcher,
    identity: Identity,
) -> None:
    other = bearer(other_tenant(sessions, settings).token)
    # Tenant A's backlog waits in the ledger (as when the queue is busy).
    a = client.post(
        "/v1/jobs/batch", json={"jobs": [{**NOOP, "limit_key": "bulk"}] * 300}, headers=auth
    )
    assert a.status_code == 202
    assert (
        client.put("/v1/limits/bulk", json={"max_running": 10_000}, headers=auth).status_code == 200
    )
    b = [submit(client, other, limit_key="b")["id"] for _ in range(3)]
    client.put("/v1/limits/b", json={"max_running": 100}, headers=other)
    passed = dispatcher.run_once()
    # A pass takes each tenant's next jobs turn by turn: B's three are among the first.
    assert passed.published == settings.dispatch_per_tenant + len(b)
    assert published(sessions, b) == set(b)
    assert settings.default_queue in passed.busy


def test_a_burst_past_the_in_flight_room_waits_for_the_dispatcher(
    make_app: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    redis_client: Redis,
) -> None:
    # No earlier test's messages or busy flag: the queue starts shallow.
    redis_client.delete(BUSY_KEY, *queue_lists(settings.default_queue))
    client = make_app(dispatch_in_flight=5).test_client()
    batch = client.post("/v1/jobs/batch", json={"jobs": [NOOP] * 12}, headers=auth)
    ids = [item["id"] for item in batch.get_json()["items"]]
    # Five go straight to the broker; the rest would queue behind them: they take turns.
    assert published(sessions, ids) == set(ids[:5])
    views = [client.get(f"/v1/jobs/{i}", headers=auth).get_json() for i in ids]
    assert [v["waiting_for"] for v in views] == [None] * 5 + ["fair_share"] * 7
    # Once the gate has read the broker's depth (five), a later submit waits too.
    gate = client.application.extensions["conveyor"].gate
    gate._checked = -float("inf")
    assert submit(client, auth)["waiting_for"] == "fair_share"
    # The broker drained: the queue is shallow again.
    redis_client.delete(*queue_lists(settings.default_queue))
    gate._checked = -float("inf")
    assert submit(client, auth)["waiting_for"] is None


def test_a_pass_with_the_broker_down_publishes_nothing_and_the_next_one_catches_up(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
) -> None:
    ids = [submit(client, auth, limit_key="outage")["id"] for _ in range(3)]
    client.put("/v1/limits/outage", json={"max_running": 10}, headers=auth)
    # Nothing listens on port 1: the broker's depth is unknown, so no room is assumed.
    dispatcher._redis = Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=1)
    assert dispatcher.run_once().published == 0
    assert published(sessions, ids) == set()
    dispatcher._redis = None
    assert dispatcher.run_once().published == 3
    assert published(sessions, ids) == set(ids)


def test_limits_over_http(client: Any, auth: dict[str, str], role_tokens: dict[str, str]) -> None:
    assert client.put("/v1/limits/x", json={}, headers=auth).status_code == 422
    assert client.put("/v1/limits/a:b", json={"max_running": 1}, headers=auth).status_code in (
        404,
        422,
    )
    member = bearer(role_tokens["member"])
    assert client.put("/v1/limits/x", json={"max_running": 1}, headers=member).status_code == 403
    assert (
        client.put(
            "/v1/limits/x", json={"max_running": 3, "per_second": 1.5}, headers=auth
        ).status_code
        == 200
    )
    listed = client.get("/v1/limits", headers=member).get_json()["items"]
    assert [(i["key"], i["max_running"], i["per_second"]) for i in listed] == [("x", 3, 1.5)]
    assert client.delete("/v1/limits/x", headers=auth).status_code == 204
    assert client.get("/v1/limits/x", headers=auth).status_code == 404
    assert client.delete("/v1/limits/x", headers=auth).status_code == 404


def test_another_tenants_limits_and_pauses_are_its_own(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], settings: Settings
) -> None:
    other = bearer(other_tenant(sessions, settings).token)
    client.put("/v1/limits/shared-name", json={"max_running": 1}, headers=auth)
    assert client.get("/v1/limits/shared-name", headers=other).status_code == 404
    client.post(f"/v1/queues/{settings.default_queue}/pause", headers=auth)
    listed = client.get("/v1/queues", headers=other).get_json()["queues"]
    assert all(not q["paused"] for q in listed)


def test_a_new_limit_counts_the_jobs_already_running_under_its_key(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], worker_app: Any
) -> None:
    job = submit(client, auth, limit_key="late", type="system.sleep", payload={"seconds": 0})
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == uuid.UUID(job["id"])).values(state=JobState.RUNNING)
        )
    created = client.put("/v1/limits/late", json={"max_running": 1}, headers=auth).get_json()
    assert created["running"] == 1


def test_a_held_submit_wakes_the_dispatcher_in_its_insert_and_a_published_one_does_not(
    client: Any, auth: dict[str, str], engine: Any, worker_app: Any
) -> None:
    """The wake-up rides in the submit's one insert statement, and only when a job waits."""
    import psycopg
    from sqlalchemy import event

    from conveyor.ledger.statements import DISPATCH_CHANNEL

    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    api_engine = client.application.extensions["conveyor"].engine
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(api_engine, "before_cursor_execute", seen)
    try:
        with psycopg.connect(url, autocommit=True) as listener:
            listener.execute(f"LISTEN {DISPATCH_CHANNEL}")
            held = submit(client, auth, limit_key="one-at-a-time")
            assert held["waiting_for"] == "limit"
            woken = list(listener.notifies(timeout=2, stop_after=1))
            assert [n.channel for n in woken] == [DISPATCH_CHANNEL]
            assert not any("pg_notify" in s and "INSERT" not in s for s in statements)
            plain = submit(client, auth)
            assert plain["waiting_for"] is None
            assert list(listener.notifies(timeout=0.5)) == []
    finally:
        event.remove(api_engine, "before_cursor_execute", seen)
