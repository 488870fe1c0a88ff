"""The Celery app Conveyor's API, worker and beat are built from: its reliability settings."""

from __future__ import annotations

from typing import Any

from celery import Celery

from conveyor.settings import Settings

# Conveyor's job priorities, 0 to 9 (9 runs first); Redis keeps one list per level.
PRIORITY_LEVELS = range(10)
PRIORITY_SEPARATOR = ":"


def create_celery(settings: Settings, *, name: str) -> Celery:
    """Build a Celery app with Conveyor's reliability settings; connects to nothing yet.

    No result backend: results live in the ledger and live views in Conveyor's own Redis
    keys (`conveyor.live.store`). A backend would cost a worker round trips per job and a
    publishing process ~20% of its enqueue rate (measured on our 2-core machines).
    """
    app = Celery(name, broker=settings.broker, set_as_current=False)
    app.conf.update(
        # Acknowledge after the job ran, so a worker that dies mid-job gets it redelivered;
        # the claim guard in PostgreSQL turns the redelivery of a finished job into a no-op.
        task_acks_late=True,
        # A child killed by the OOM killer or SIGKILL requeues its message instead of acking it.
        task_reject_on_worker_lost=True,
        # Keep running jobs when the broker connection drops (Celery 6 will cancel them):
        # the job's attempt owns its row, finishes once, and the redelivered message is
        # skipped by the claim guard; cancelling would waste the work and an attempt.
        # Celery 5.7 still warns of the coming default at every reconnect.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Prefetch one message per process: long jobs must not hoard messages other
        # workers could run, and fewer unacked messages are exposed to redelivery.
        worker_prefetch_multiplier=1,
        broker_transport_options=_transport_options(settings),
        # honcho starts processes in no order: wait for the broker instead of crashing.
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        task_default_queue=settings.default_queue,
        task_serializer="json",
        accept_content=["json"],
        # Events let Flower show every task by its job type.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=False,
        enable_utc=True,
    )
    if settings.amqp_broker:
        app.conf.update(_amqp_conf())
    return app


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.amqp_broker:
        # Each publish waits for RabbitMQ's confirm: a publish counts as done (the ledger
        # keeps or writes `published_at`) only once the broker has taken responsibility
        # for its message (written to disk, as the queue is durable and the message
        # persistent). A nack raises; so does a confirm that does not come (see
        # CeleryPublisher), and an API submit then clears `published_at` for the promoter.
        return {"confirm_publish": True}
    return {
        # Redis redelivers unacked messages after this long. It must outlast the longest
        # job's hard time limit, or a slow job would be delivered to a second worker while
        # it still runs (the claim guard still stops it from running twice).
        "visibility_timeout": settings.visibility_timeout,
        # Redis has no message priority: kombu keeps one list per level, `queue:N`,
        # and reads lower N first. Ten levels carry Conveyor's ten priorities.
        "priority_steps": list(PRIORITY_LEVELS),
        "sep": PRIORITY_SEPARATOR,
        # With `-Q critical,default,low` a worker drains queues in that order.
        "queue_order_strategy": "priority",
    }


def _amqp_conf() -> dict[str, Any]:
    """Return the Celery settings that make RabbitMQ keep Conveyor's promises."""
    return {
        # Classic durable queues with native priorities, not quorum queues: RabbitMQ
        # 3.10's quorum queues ignore message priority (4.0 gives them two levels), and
        # Conveyor has ten. Every process declares every queue with the same
        # `x-max-priority`, as RabbitMQ refuses a redeclaration with other arguments.
        # The price is no replication: a lost RabbitMQ disk loses messages, and the
        # reconciler re-drives those jobs from the ledger (docs/operations/brokers.md).
        "task_default_queue_type": "classic",
        "task_create_missing_queue_type": "classic",
        "task_queue_max_priority": max(PRIORITY_LEVELS),
        # Queues, exchanges and messages outlive a broker restart.
        "task_default_delivery_mode": "persistent",
        # RabbitMQ closes a channel whose delivery stays unacknowledged past its
        # consumer_timeout (30 minutes by default): a long job with acks_late does that.
        # Celery treats the closed channel as fatal unless told to reconnect, and must not
        # cancel the job still running: RabbitMQ requeues its message, the claim guard
        # skips that redelivery, and the job finishes once.
        "broker_channel_error_retry": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
