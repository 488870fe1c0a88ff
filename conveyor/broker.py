"""The Celery configuration shared by the API (which only publishes) and the worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from celery import Celery

from conveyor.settings import Settings


def create_celery(settings: Settings, *, name: str, with_result_backend: bool) -> Celery:
    """Build a Celery app with Conveyor's reliability settings; connects to nothing yet."""
    # The API has no result backend: a backend in a publishing process subscribes per task
    # and costs ~20% of the enqueue rate (PITFALLS.md); it reads progress with plain GETs.
    app = Celery(
        name,
        broker=settings.broker,
        backend=settings.result_backend if with_result_backend else None,
        set_as_current=False,
    )
    app.conf.update(
        # Acknowledge after the job ran, so a worker that dies mid-job gets it redelivered;
        # the claim guard in PostgreSQL turns the redelivery of a finished job into a no-op.
        task_acks_late=True,
        # A child killed by the OOM killer or SIGKILL requeues its message instead of acking it.
        task_reject_on_worker_lost=True,
        # Prefetch one message per process: long jobs must not hoard messages other
        # workers could run, and fewer unacked messages are exposed to redelivery.
        worker_prefetch_multiplier=1,
        # Redis keeps live state and progress for a day; the ledger keeps results for good.
        result_expires=settings.result_expires,
        # Redis redelivers unacked messages after this long. It must outlast the longest
        # job's hard time limit, or a slow job would be delivered to a second worker while
        # it still runs (the claim guard still stops it from running twice).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        # honcho starts processes in no order: wait for the broker instead of crashing.
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        task_default_queue=settings.default_queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Events let Flower show every task by its job type.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=False,
        enable_utc=True,
    )
    return app


@dataclass(frozen=True)
class Message:
    """What the broker carries for one job: its id and where it goes, never its payload."""

    job_id: uuid.UUID
    task_name: str
    queue: str
    # The submitting request's id, so the worker's log lines for the job can quote it.
    request_id: str | None = None


# The Celery message header carrying the request id; the worker binds it to its log lines.
REQUEST_ID_HEADER = "conveyor_request_id"


class CeleryPublisher:
    """Publishes job ids by task name, so the API never imports worker code."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    @property
    def app(self) -> Celery:
        """Return the Celery app it publishes through (for broker queries and broadcasts)."""
        return self._app

    def publish(self, messages: Iterable[Message]) -> None:
        """Send one message per job, with the job id as both task id and only argument."""
        with self._app.producer_or_acquire() as producer:
            for message in messages:
                job_id = str(message.job_id)
                self._app.send_task(
                    message.task_name,
                    args=[job_id],
                    task_id=job_id,
                    queue=message.queue,
                    producer=producer,
                    ignore_result=True,
                    headers={REQUEST_ID_HEADER: message.request_id} if message.request_id else None,
                )
