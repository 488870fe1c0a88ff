"""The broker, Redis or RabbitMQ: what Conveyor declares on it and how it orders and refuses."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import pytest
from pydantic import SecretStr
from redis import Redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.broker.config import create_celery
from conveyor.broker.inspect import queue_lists
from conveyor.broker.internals import worker_task_channel
from conveyor.broker.publisher import CeleryPublisher, Message
from conveyor.errors import PublishFailed
from conveyor.models import JobEvent
from conveyor.settings import Settings
from tests.conftest import bearer, fresh_queue, in_process_worker, wait_for
from worker.app import create_celery_app

# Nothing listens on port 1: building apps on it connects nothing, publishing fails.
NO_RABBIT = SecretStr("amqp://guest:guest@127.0.0.1:1//")


def test_on_rabbitmq_queues_are_durable_with_native_priorities_and_confirmed_publishes(
    base_settings: Settings,
) -> None:
    app = create_celery_app(base_settings.model_copy(update={"broker_url": NO_RABBIT}))
    try:
        queue = app.amqp.queues[app.conveyor.settings.default_queue]  # what the worker consumes
        assert (queue.durable, queue.queue_arguments) == (True, {"x-max-priority": 9})
        # A queue only the API names (a job's own queue) is declared the same way.
        assert app.amqp.queues["elsewhere"].queue_arguments == {"x-max-priority": 9}
        assert app.conf.broker_transport_options == {"confirm_publish": True}
        assert app.conf.task_default_delivery_mode == "persistent"
        # A channel closed by RabbitMQ's consumer_timeout reconnects and cancels no job.
        assert app.conf.broker_channel_error_retry is True
        assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is False
        assert (app.conf.task_acks_late, app.conf.task_reject_on_worker_lost) == (True, True)
    finally:
        app.conveyor.engine.dispose()


def test_on_rabbitmq_jobs_that_outrun_the_consumer_timeout_are_named_not_refused(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # On Redis a visibility timeout of 3650 s refuses system.sleep (3700 s); RabbitMQ has
    # none, and outrunning its consumer_timeout costs a reconnect, never a second run.
    amqp = base_settings.model_copy(update={"broker_url": NO_RABBIT, "visibility_timeout": 3650})
    with caplog.at_level(logging.WARNING, logger="worker.app"):
        app = create_celery_app(amqp)
    app.conveyor.engine.dispose()
    (record,) = [r for r in caplog.records if "consumer_timeout" in r.getMessage()]
    assert "(1800s)" in record.getMessage()
    assert "system.sleep (3700s)" in record.getMessage()
    assert "system.noop (1800s)" in record.getMessage()  # the default limit reaches it too
    caplog.clear()
    roomy = amqp.model_copy(update={"amqp_consumer_timeout": 7200})
    with caplog.at_level(logging.WARNING, logger="worker.app"):
        create_celery_app(roomy).conveyor.engine.dispose()
    assert not [r for r in caplog.records if "consumer_timeout" in r.getMessage()]


def test_readyz_names_a_dead_rabbitmq(base_settings: Settings) -> None:
    from api import create_app

    api = create_app(base_settings.model_copy(update={"broker_url": NO_RABBIT}))
    try:
        response = api.test_client().get("/readyz")
    finally:
        api.extensions["conveyor"].engine.dispose()
    assert response.status_code == 503
    assert response.get_json()["checks"]["broker"] == "unavailable"
    assert response.get_json()["checks"]["result_backend"] == "ok"  # Redis still


def test_a_dead_rabbitmq_is_one_publish_failed(base_settings: Settings) -> None:
    dead = base_settings.model_copy(update={"broker_url": NO_RABBIT})
    publisher = CeleryPublisher(create_celery(dead, name="dead"))
    with pytest.raises(PublishFailed, match="the broker did not take the messages"):
        publisher.publish([Message(uuid.uuid4(), "system.noop", "q")])


@pytest.mark.brokers
def test_the_broker_delivers_higher_priorities_first(
    settings: Settings, redis_client: Redis
) -> None:
    queue = fresh_queue(settings, "prio")
    app = create_celery(settings, name="prio")
    ids = {priority: uuid.uuid4() for priority in (0, 9, 5, 1)}
    CeleryPublisher(app).publish(
        Message(job_id, "system.noop", queue, priority) for priority, job_id in ids.items()
    )
    try:
        with app.connection_for_read() as conn:
            bound = app.amqp.queues[queue](conn.default_channel)
            got = [uuid.UUID(bound.get(no_ack=True).headers["id"]) for _ in ids]
        assert got == [ids[9], ids[5], ids[1], ids[0]]
    finally:
        if not settings.amqp_broker:  # RabbitMQ's queues go at the end of the run
            redis_client.delete(*queue_lists(queue))


# Celery's worker thread warns on each connection loss that its default will cancel such
# jobs in 6.0 (Conveyor sets that option explicitly); pytest lists it in its summary (a
# filterwarnings mark on this test did not silence it).
@pytest.mark.e2e
def test_on_rabbitmq_a_job_outliving_its_channel_runs_once(
    amqp_settings: Settings,
    identity: Identity,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from amqp.channel import Channel

    from api import create_app
    from tests.test_e2e import finished, submit

    # A py-amqp connection is not thread-safe: a second thread waiting for a reply on the
    # worker's connection steals frames from the event loop, and one of the two then waits
    # for ever. Record which threads consume and which set the prefetch count (basic.qos
    # waits for its qos-ok).
    consuming: set[int] = set()
    prefetch: list[tuple[int, int]] = []
    basic_consume, basic_qos = Channel.basic_consume, Channel.basic_qos

    def consume(channel: Channel, *args: Any, **kwargs: Any) -> Any:
        consuming.add(threading.get_ident())
        return basic_consume(channel, *args, **kwargs)

    def qos(channel: Channel, prefetch_size: int, prefetch_count: int, a_global: bool) -> Any:
        prefetch.append((threading.get_ident(), prefetch_count))
        return basic_qos(channel, prefetch_size, prefetch_count, a_global)

    monkeypatch.setattr(Channel, "basic_consume", consume)
    monkeypatch.setattr(Channel, "basic_qos", qos)
    api = create_app(amqp_settings)
    client = api.test_client()
    assert client.get("/readyz").status_code == 200
    auth = bearer(identity.token)
    app = create_celery_app(amqp_settings)
    with in_process_worker(app) as running:
        job_id = submit(client, auth, "system.sleep", {"seconds": 2})
        wait_for(lambda: client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["progress"])
        # What consumer_timeout does to a long job: RabbitMQ closes the worker's channel with
        # 406 PRECONDITION_FAILED and requeues its deliveries. An ack of an unknown tag earns
        # the same close at once (one frame written from this thread: py-amqp serializes
        # writes; only reading the connection belongs to the worker's event loop).
        worker_task_channel(running).basic_ack(999_999)
        body = wait_for(lambda: finished(client, auth, job_id), timeout=30)
        assert (body["state"], body["attempts"]) == ("succeeded", 1)
        # The worker reconnected and serves the next job; the requeued one was skipped.
        other = submit(client, auth, "system.noop", {})
        assert wait_for(lambda: finished(client, auth, other))["state"] == "succeeded"
        # The prefetch count, cut to one at the reconnect, is back to one per pool thread.
        wait_for(lambda: prefetch[-1][1] == 2)
    app.conveyor.engine.dispose()
    api.extensions["conveyor"].engine.dispose()
    with sessions() as session:
        runs = session.scalar(
            select(func.count()).where(
                JobEvent.job_id == uuid.UUID(job_id), JobEvent.to_state == "running"
            )
        )
    assert runs == 1
    # Every change of the prefetch count, the restoring ones included, came from the
    # consuming thread (Celery's own restore runs in the pool thread that acks).
    assert 1 in [count for _, count in prefetch]
    assert {thread for thread, _ in prefetch} <= consuming
