"""The task runner in-process on real PostgreSQL and Redis: round trips, atomicity, results."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import BaseModel
from redis import Redis
from redis.connection import AbstractConnection
from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.live.store import view_key
from conveyor.models import Job, Tenant
from conveyor.registry import JobContext, JobRegistry
from conveyor.settings import Settings
from conveyor.webhooks import DELIVER_TYPE, create_webhook
from tests.conftest import transitions
from tests.factories import job_factory
from worker.app import create_celery_app
from worker.runner import run_job


class Steps(BaseModel):
    """What the test job does while it runs."""

    write: bool = False
    read: bool = False
    steal: bool = False
    subscribe: str | None = None
    after_commit: bool = False


# Set by the `steps` job type for the test to look at.
SEEN: dict[str, Any] = {}
TYPES = JobRegistry()


@TYPES.job_type("tests.steps", payload=Steps)
def steps(ctx: JobContext, payload: Steps) -> dict[str, Any]:
    """Touch the job's session (or not), lose the job, or subscribe a webhook, on request."""
    app = SEEN["app"]
    if payload.write:
        ctx.session.add(Tenant(name=f"written by {ctx.job_id}"))  # flushed by the runner
    if payload.read:
        ctx.session.get(Tenant, ctx.tenant_id)
    if payload.steal:
        # PostgreSQL lost the claim (it commits without a WAL flush) and a new claim took
        # the job: the same attempt number, another token.
        with app.conveyor.engine.begin() as conn:
            conn.execute(
                update(Job).where(Job.id == ctx.job_id).values(claim_token=func.gen_random_uuid())
            )
    if payload.subscribe:
        with Session(app.conveyor.engine) as other, other.begin():
            create_webhook(other, ctx.tenant_id, payload.subscribe, ["job.succeeded"])
    if payload.after_commit:

        def look() -> None:
            with Session(app.conveyor.engine) as other:
                SEEN["state after commit"] = other.get_one(Job, ctx.job_id).state

        ctx.after_commit(look)
    return {"done": True}


@pytest.fixture(scope="module")
def celery_app(settings: Settings) -> Iterator[Any]:
    """Yield the worker's Celery app (no worker: tests call run_job), heartbeats out of the way."""
    app = create_celery_app(settings.model_copy(update={"heartbeat_interval": 3600}))
    yield app
    app.conveyor.engine.dispose()


@pytest.fixture
def steps_app(celery_app: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Return the app with the `tests.steps` type runnable (deliveries stay registered)."""
    monkeypatch.setattr(celery_app.conveyor, "registry", TYPES)
    monkeypatch.setitem(SEEN, "app", celery_app)
    return celery_app


def submit_steps(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    callback_url: str | None = None,
    **steps: Any,
) -> str:
    with sessions.begin() as session:
        job = job_factory(
            session, tenant_id, "tests.steps", steps, registry=TYPES, callback_url=callback_url
        )
        return str(job.id)


def run(app: Any, job_id: str) -> str:
    return run_job(app.conveyor, job_id)


@contextmanager
def sent(engine: Engine) -> Iterator[Counter[str]]:
    """Count what this thread sends to PostgreSQL (BEGIN/COMMIT only off autocommit) and Redis."""
    counts: Counter[str] = Counter()
    me = threading.get_ident()

    def counter(name: str) -> Any:
        def count(conn: Any, *_: Any) -> None:
            autocommit = conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
            if threading.get_ident() == me and (name == "before_cursor_execute" or not autocommit):
                counts[name] += 1

        return count

    listeners = [
        (name, counter(name)) for name in ("before_cursor_execute", "begin", "commit", "rollback")
    ]
    for name, listener in listeners:
        event.listen(engine, name, listener)
    send = AbstractConnection.send_packed_command

    def to_redis(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == me:
            counts["redis"] += 1  # one write of one command or a whole pipeline
        send(self, command, check_health)

    AbstractConnection.send_packed_command = to_redis  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
        for name, listener in listeners:
            event.remove(engine, name, listener)


def deliveries(sessions: sessionmaker[Session], job_id: str) -> list[str]:
    with sessions() as session:
        payloads = session.scalars(select(Job.payload).where(Job.type == DELIVER_TYPE)).all()
    return sorted(p["url"] for p in payloads if p["job_id"] == job_id)


def test_a_noop_job_is_two_autocommit_statements_and_one_redis_round_trip(
    celery_app: Any, identity: Identity, sessions: sessionmaker[Session], redis_client: Redis
) -> None:
    with sessions.begin() as session:
        warm_up, job_id = (str(job_factory(session, identity.tenant.id).id) for _ in range(2))
    assert run(celery_app, warm_up) == "succeeded"  # connects (a handshake is round trips too)
    with sent(celery_app.conveyor.engine) as counts:
        assert run(celery_app, job_id) == "succeeded"
    # The claim and the finish, one autocommit statement each (the job wrote nothing: its
    # transaction never began); the running view (held until the finish made the claim
    # durable) and the finished one, in one pipeline.
    assert counts == {"before_cursor_execute": 2, "redis": 1}
    assert transitions(sessions, job_id) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    view = json.loads(redis_client.hget(view_key(uuid.UUID(job_id)), "doc") or "{}")
    assert view["state"] == "succeeded"


def test_a_job_that_writes_commits_its_writes_with_its_success(
    steps_app: Any, identity: Identity, sessions: sessionmaker[Session]
) -> None:
    job_id = submit_steps(sessions, identity.tenant.id, write=True)
    with sent(steps_app.conveyor.engine) as counts:
        assert run(steps_app, job_id) == "succeeded"
    # The claim; then one transaction: the job's insert and the finish.
    assert (counts["begin"], counts["commit"], counts["before_cursor_execute"]) == (1, 1, 3)
    with sessions() as session:
        written = session.scalar(select(Tenant).where(Tenant.name == f"written by {job_id}"))
        assert written is not None
        assert session.get_one(Job, uuid.UUID(job_id)).state == "succeeded"


def test_a_job_that_only_reads_finishes_in_its_transaction(
    steps_app: Any, identity: Identity, sessions: sessionmaker[Session]
) -> None:
    job_id = submit_steps(sessions, identity.tenant.id, read=True)
    with sent(steps_app.conveyor.engine) as counts:
        assert run(steps_app, job_id) == "succeeded"
    assert (counts["begin"], counts["commit"]) == (1, 1)


@pytest.mark.parametrize("write", [True, False], ids=["writes", "writes nothing"])
def test_a_job_that_lost_its_claim_rolls_back_and_is_not_succeeded(
    steps_app: Any, identity: Identity, sessions: sessionmaker[Session], write: bool
) -> None:
    job_id = submit_steps(sessions, identity.tenant.id, write=write, steal=True)
    assert run(steps_app, job_id) == "lost"
    with sessions() as session:
        job = session.get_one(Job, uuid.UUID(job_id))
        assert (job.state, job.attempt, job.result) == ("running", 1, None)
        written = session.scalar(select(Tenant).where(Tenant.name == f"written by {job_id}"))
        assert written is None
    assert transitions(sessions, job_id)[-1] == ("queued", "running")


def test_deliveries_commit_with_the_success(
    steps_app: Any, identity: Identity, sessions: sessionmaker[Session]
) -> None:
    # A webhook that starts listening while the job runs, after its claim, is not missed.
    during = "https://during.example/hook"
    job_id = submit_steps(sessions, identity.tenant.id, subscribe=during)
    with sent(steps_app.conveyor.engine) as counts:
        assert run(steps_app, job_id) == "succeeded"
    assert deliveries(sessions, job_id) == [during]
    # In the success's own statement, not beside it: the job wrote nothing, so that is one
    # autocommit statement; the one commit is the webhook's.
    assert counts["commit"] == 1
    # A callback URL and a listening webhook.
    called = submit_steps(sessions, identity.tenant.id, callback_url="https://cb.example/x")
    assert run(steps_app, called) == "succeeded"
    assert deliveries(sessions, called) == ["https://cb.example/x", during]


def test_after_commit_steps_run_once_the_success_committed(
    steps_app: Any, identity: Identity, sessions: sessionmaker[Session]
) -> None:
    job_id = submit_steps(sessions, identity.tenant.id, after_commit=True)
    assert run(steps_app, job_id) == "succeeded"
    assert SEEN.pop("state after commit") == "succeeded"


def test_a_duplicate_delivery_never_runs_the_job_again(
    celery_app: Any, identity: Identity, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        job_id = str(job_factory(session, identity.tenant.id).id)
    assert [run(celery_app, job_id) for _ in range(3)] == ["succeeded", "skipped", "skipped"]
    assert [e for e in transitions(sessions, job_id) if e[1] == "succeeded"] == [
        ("running", "succeeded")
    ]
