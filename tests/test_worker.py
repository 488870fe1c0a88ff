"""Worker internals on real PostgreSQL: heartbeats, the housekeeping loop, error hygiene."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import broker_task_ids, queue_depth, queue_lists
from conveyor.broker.internals import UNACKED_INDEX_KEY
from conveyor.broker.publisher import CeleryPublisher, Message
from conveyor.errors import ConveyorError, JobFailed
from conveyor.ledger.transitions import claim
from conveyor.ledger.work import UnitOfWork, Work
from conveyor.live.store import view_key
from conveyor.models import Job
from conveyor.settings import Settings
from tests.conftest import fresh_queue, wait_for, waiting
from tests.factories import job_factory
from worker.app import create_celery_app
from worker.housekeeping import Housekeeper
from worker.runner import Heartbeats, public_error


def test_heartbeats_refresh_running_jobs_until_they_end(
    identity: Identity, sessions: sessionmaker[Session], work: Work
) -> None:
    with sessions.begin() as session:
        job_id = job_factory(session, identity.tenant.id).id
        claimed = claim(
            UnitOfWork.around(session), job_id, "w1", datetime.now(UTC) - timedelta(hours=1)
        )
        assert claimed is not None

    def heartbeat() -> datetime | None:
        with sessions() as session:
            return session.get_one(Job, job_id).heartbeat_at

    stale = heartbeat()
    assert stale is not None
    heartbeats = Heartbeats(work, interval=0.05)
    with heartbeats.running(claimed):
        wait_for(lambda: (heartbeat() or stale) > stale + timedelta(minutes=59))
    after = heartbeat()
    heartbeats_seen = {heartbeat() for _ in range(5)}
    # Out of the block the job is no longer refreshed (one pass may have been under way).
    assert len(heartbeats_seen - {after}) <= 1


def test_a_claim_is_shown_running_by_its_first_heartbeat_soon_after_it(
    identity: Identity, sessions: sessionmaker[Session], work: Work
) -> None:
    with sessions.begin() as session:
        job_id = job_factory(session, identity.tenant.id).id
    with work.single_statement() as unit:
        claimed = claim(unit, job_id, "w1", datetime.now(UTC))
    assert claimed is not None
    assert work.live is not None
    live = work.live

    def shown() -> str | None:
        doc = live.redis.hget(view_key(job_id), "doc")
        return json.loads(doc)["state"] if doc else None

    assert shown() is None  # the claim may not be durable yet: nothing shows it
    # The regular heartbeat is an hour away; a fresh claim gets its own beat.
    with Heartbeats(work, interval=3600).running(claimed):
        started = time.monotonic()
        assert wait_for(lambda: shown() == "running", timeout=5)
    assert time.monotonic() - started < 4


def test_database_errors_reach_clients_without_sql() -> None:
    raw = IntegrityError("INSERT INTO secrets VALUES (%(x)s)", {"x": "pw"}, Exception("dup"))
    public = public_error(raw)
    assert type(public).__name__ == "DatabaseError"
    assert isinstance(public, ConveyorError)
    assert "INSERT" not in str(public)
    assert "IntegrityError" in str(public)
    plain = ValueError("bad amount")
    assert public_error(plain) is plain


def test_celerys_time_limits_reach_clients_as_the_trees_errors_of_the_same_name() -> None:
    from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

    hard = public_error(TimeLimitExceeded(1800))
    soft = public_error(SoftTimeLimitExceeded())
    assert isinstance(hard, JobFailed)
    assert isinstance(soft, JobFailed)
    # `error.type` shows clients the class name: it stays what it was.
    assert (type(hard).__name__, type(soft).__name__) == (
        "TimeLimitExceeded",
        "SoftTimeLimitExceeded",
    )
    assert str(hard) == "the job ran past its hard time limit of 1800s and was killed"
    assert str(soft) == "the job ran past its soft time limit"


@pytest.mark.brokers
def test_the_housekeeping_loop_promotes_on_its_own(
    settings: Settings, identity: Identity, sessions: sessionmaker[Session], redis_client: Any
) -> None:
    queue = fresh_queue(settings, "hk")
    app = create_celery_app(
        settings.model_copy(update={"promote_interval": 0.05, "default_queue": queue})
    )
    with sessions.begin() as session:
        job = job_factory(session, identity.tenant.id)
        job.queue = queue
        job.state = "retrying"
        job.scheduled_for = datetime.now(UTC)
    housekeeper = Housekeeper.for_app(app)
    housekeeper.start()

    def published() -> bool:
        with sessions() as session:
            return session.get_one(Job, job.id).published_at is not None

    try:
        wait_for(published)
    finally:
        housekeeper.stop()
        app.conveyor.engine.dispose()
    assert waiting(settings, queue) == 1
    if not settings.amqp_broker:  # RabbitMQ's queues go at the end of the run
        redis_client.delete(f"{queue}:9")


def test_the_housekeeping_loop_survives_a_database_outage(settings: Settings) -> None:
    from worker.leadership import Leadership

    broken = settings.model_copy(
        update={"database_url": SecretStr("postgresql://nobody@/nowhere?host=/nonexistent")}
    )
    app = create_celery_app(broken)
    assert Leadership(app.conveyor).hold() is False  # no database, no leader
    housekeeper = Housekeeper.for_app(app)
    housekeeper.start()
    try:
        time.sleep(0.5)
        assert housekeeper._thread is not None
        assert housekeeper._thread.is_alive()
    finally:
        housekeeper.stop()
        app.conveyor.engine.dispose()
    assert not housekeeper._thread.is_alive()


@pytest.mark.parametrize("limit", [7200, 9000])
def test_a_default_limit_beyond_the_visibility_timeout_is_refused(
    settings: Settings, limit: int
) -> None:
    with pytest.raises(ValueError, match="visibility timeout"):
        create_celery_app(settings.model_copy(update={"default_time_limit": limit}))


def test_a_result_over_the_cap_fails_the_job_clearly() -> None:
    from conveyor.errors import ResultTooLarge
    from worker.runner import _as_result

    assert _as_result({"ok": True}, limit=1024) == {"ok": True}
    with pytest.raises(ResultTooLarge, match="the limit is 1024"):
        _as_result({"blob": "x" * 2000}, limit=1024)


@pytest.mark.brokers
def test_the_final_result_and_progress_live_in_the_ledger_and_conveyors_keys(
    worker: Any, client: Any, auth: dict[str, str], redis_client: Any
) -> None:
    from tests.test_e2e import finished, submit

    job_id = submit(client, auth, "system.sleep", {"seconds": 0.2})
    done = wait_for(lambda: finished(client, auth, job_id))
    assert "slept" in done["result"]
    # The sleep reported progress; Conveyor keeps it under its own key, Celery keeps nothing.
    assert redis_client.get(f"conveyor:progress:{job_id}") is not None
    assert redis_client.keys(f"celery-task-meta-{job_id}") == []


def test_a_hard_time_limit_fails_the_attempt_at_once(
    worker: Any, identity: Identity, sessions: sessionmaker[Session]
) -> None:
    from celery.exceptions import TimeLimitExceeded

    with sessions.begin() as session:
        job = job_factory(session, identity.tenant.id, max_attempts=2)
        claim(UnitOfWork.around(session), job.id, "w1", datetime.now(UTC))
    task = worker.tasks["system.noop"]
    # What Celery's main process does when it kills a child past the hard limit.
    task.on_failure(TimeLimitExceeded(1800), str(job.id), (str(job.id),), {}, None)
    with sessions() as session:
        retried = session.get_one(Job, job.id)
        assert (retried.state, retried.error_type) == ("retrying", "TimeLimitExceeded")
        assert retried.error_message == (
            "the job ran past its hard time limit of 1800s and was killed"
        )
    # Any other failure of the task wrapper, or an unknown job, leaves the ledger alone.
    task.on_failure(RuntimeError("x"), str(job.id), (), {}, None)
    task.on_failure(TimeLimitExceeded(1), str(uuid.uuid4()), (), {}, None)
    with sessions() as session:
        assert session.get_one(Job, job.id).state == "retrying"


def test_the_reconciler_redrives_a_job_whose_message_was_lost(
    settings: Settings, identity: Identity, sessions: sessionmaker[Session], redis_client: Any
) -> None:
    queue = f"rc-{uuid.uuid4().hex[:8]}"
    app = create_celery_app(settings.model_copy(update={"default_queue": queue}))
    housekeeper = Housekeeper.for_app(app)
    try:
        with sessions.begin() as session:
            kept, lost = (job_factory(session, identity.tenant.id) for _ in range(2))
            for job in (kept, lost):
                job.queue = queue
        CeleryPublisher(app).publish([Message.of(kept), Message.of(lost)])
        for raw in redis_client.lrange(f"{queue}:9", 0, -1):  # the broker loses one message
            if json.loads(raw)["headers"]["id"] == str(lost.id):
                redis_client.lrem(f"{queue}:9", 0, raw)
        with sessions.begin() as session:
            for job_id in (kept.id, lost.id):
                session.get_one(Job, job_id).published_at = datetime.now(UTC) - timedelta(hours=1)
        assert queue_depth(redis_client, queue) == 1
        assert housekeeper.reconcile() == 1
        assert queue_depth(redis_client, queue) == 2
        present = broker_task_ids(redis_client, [queue], limit=100)
        assert present == {str(kept.id), str(lost.id)}
        assert broker_task_ids(redis_client, [queue], limit=1) is None  # too deep to read
        with sessions() as session:
            assert session.get_one(Job, lost.id).published_at > datetime.now(UTC) - timedelta(
                minutes=1
            )
        assert housekeeper.reconcile() == 0  # freshly published: nothing stale now
    finally:
        redis_client.delete(*queue_lists(queue))
        app.conveyor.engine.dispose()


def test_the_reconciler_redrives_a_job_whose_consumer_died_before_claiming(
    settings: Settings, identity: Identity, sessions: sessionmaker[Session], redis_client: Any
) -> None:
    queue = f"rc-{uuid.uuid4().hex[:8]}"
    app = create_celery_app(settings.model_copy(update={"default_queue": queue}))
    housekeeper = Housekeeper.for_app(app)
    try:
        with sessions.begin() as session:
            job = job_factory(session, identity.tenant.id)
            job.queue = queue
        CeleryPublisher(app).publish([Message.of(job)])
        with sessions.begin() as session:
            session.get_one(Job, job.id).published_at = datetime.now(UTC) - timedelta(hours=1)
        # A consumer takes the message (kombu moves it to its unacked hash) and never claims.
        with app.connection_for_read() as conn:
            taken = conn.default_channel.basic_get(queue, no_ack=False)
            assert taken is not None
            # Taken just now: its consumer may be about to claim it.
            assert housekeeper.reconcile() == 0
            # Taken long ago, by a consumer that died since.
            old = time.time() - settings.reconcile_after - 1
            redis_client.zadd(UNACKED_INDEX_KEY, {taken.delivery_tag: old})
            assert housekeeper.reconcile() == 1
            assert queue_depth(redis_client, queue) == 1
            taken.ack()  # not back to the queue when this connection closes
    finally:
        redis_client.delete(*queue_lists(queue))
        app.conveyor.engine.dispose()


def test_on_rabbitmq_the_reconciler_redrives_the_jobs_of_a_drained_queue(
    amqp_settings: Settings, identity: Identity, sessions: sessionmaker[Session]
) -> None:
    from kombu import Connection

    queue = fresh_queue(amqp_settings, "rc")
    app = create_celery_app(amqp_settings.model_copy(update={"default_queue": queue}))
    housekeeper = Housekeeper.for_app(app)

    def published_long_ago(job_id: uuid.UUID) -> None:
        with sessions.begin() as session:
            session.get_one(Job, job_id).published_at = datetime.now(UTC) - timedelta(hours=1)

    try:
        with sessions.begin() as session:
            job = job_factory(session, identity.tenant.id)
            job.queue = queue
        CeleryPublisher(app).publish([Message.of(job)])
        published_long_ago(job.id)
        # AMQP cannot say which messages wait; one does, so the job may be behind it.
        assert waiting(amqp_settings, queue) == 1
        assert housekeeper.reconcile() == 0
        # The broker loses the message (a purge here; a lost disk in life): re-driven.
        with Connection(amqp_settings.broker) as conn, conn.channel() as channel:
            channel.queue_purge(queue)
        assert housekeeper.reconcile() == 1
        assert waiting(amqp_settings, queue) == 1
        # The queue itself is gone: re-driven, and publishing declares it again.
        with Connection(amqp_settings.broker) as conn, conn.channel() as channel:
            channel.queue_delete(queue)
        published_long_ago(job.id)
        assert housekeeper.reconcile() == 1
        assert waiting(amqp_settings, queue) == 1
        assert housekeeper.reconcile() == 0  # freshly published: nothing stale now
    finally:
        app.conveyor.engine.dispose()
