"""Publishing job ids to the broker, by task name, in pipelined batches."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from amqp.exceptions import AMQPError, MessageNacked
from celery import Celery
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from conveyor.broker.config import PRIORITY_LEVELS
from conveyor.broker.internals import (
    TaskSentEvents,
    create_task_message,
    discard_connection,
    send_task_message,
    sender_identity,
)
from conveyor.errors import PublishFailed
from conveyor.telemetry.tracing import message_headers, publishing

# Broker commands buffered per round trip when publishing many jobs at once.
PUBLISH_BATCH = 500
# Seconds an AMQP publish waits for RabbitMQ's confirm before it counts as failed.
CONFIRM_TIMEOUT = 5.0


class Publishable(Protocol):
    """A job as publishing sees it: a ledger `Job`, or one just submitted."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def type(self) -> str: ...
    @property
    def queue(self) -> str: ...
    @property
    def priority(self) -> int: ...


@dataclass(frozen=True)
class Message:
    """What the broker carries for one job: its id and where it goes, never its payload."""

    job_id: uuid.UUID
    task_name: str
    queue: str
    # Conveyor's priority: 0 to 9, 9 runs first.
    priority: int = 0
    # The submitting request's id, so the worker's log lines for the job can quote it.
    request_id: str | None = None
    # The W3C trace context the job was submitted in (stored with the job), if traced.
    trace_context: Mapping[str, str] | None = None

    @classmethod
    def of(cls, job: Publishable, request_id: str | None = None) -> Message:
        """Return the message that runs `job`."""
        return cls(job.id, job.type, job.queue, job.priority, request_id)


# The Celery message header carrying the request id; the worker binds it to its log lines.
REQUEST_ID_HEADER = "conveyor_request_id"


def _headers(message: Message) -> dict[str, str] | None:
    headers = {REQUEST_ID_HEADER: message.request_id} if message.request_id else {}
    # `traceparent`/`tracestate`, which the worker's run span continues (while tracing).
    message_headers(headers, str(message.job_id), message.task_name, message.trace_context)
    return headers or None


class CeleryPublisher:
    """Publishes job ids by task name, so the API never imports worker code."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        # Redis reads priority 0 first; AMQP brokers deliver the highest number first.
        self._redis = str(app.conf.broker_url).startswith(("redis", "rediss", "valkey"))
        # A broker blocked by a resource alarm never confirms: bound the wait, so a request
        # fails with PublishFailed (the job stays unpublished, the promoter retries it).
        self._options = {} if self._redis else {"confirm_timeout": CONFIRM_TIMEOUT}
        self._sent_events = bool(app.conf.task_send_sent_event)
        self._events = TaskSentEvents(app)

    @property
    def app(self) -> Celery:
        """Return the Celery app it publishes through (for broker queries and broadcasts)."""
        return self._app

    def _broker_priority(self, priority: int) -> int:
        return max(PRIORITY_LEVELS) - priority if self._redis else priority

    def publish(self, messages: Iterable[Message], *, redeclare: bool = False) -> None:
        """Send one message per job, with the job id as both task id and only argument.

        On Redis the messages go out pipelined (kombu's `Producer.batch`), up to
        `PUBLISH_BATCH` commands a round trip instead of one each; a failure discards what
        was not flushed yet, and the promoter publishes those jobs again. `redeclare`
        declares the queues again even where this connection did before: the reconciler's
        re-drives, for a queue that may have been deleted since (RabbitMQ confirms a
        message to an exchange with no queue bound, and drops it). The `task-sent` events
        (for Flower) go out as one list message per call, as a Celery worker sends its
        buffered task events, instead of one broker command per job.
        """
        batch = list(messages)
        if not batch:
            return
        # What send_task would work out per message, worked out once per call.
        origin, reply_to = sender_identity(self._app)
        events: list[dict[str, Any]] = []
        # Queues declared by this call. Celery declares a message's queue with every
        # message, and kombu binds a copy of the queue and its exchange each time just to
        # find it declared already: a third of a message's publishing cost.
        declared: set[str] = set()
        with (
            publishing(len(batch), [m.queue for m in batch]),
            self._app.producer_or_acquire() as producer,
        ):
            if redeclare:
                producer.connection.declared_entities.clear()
            try:
                with producer.batch(PUBLISH_BATCH):
                    for message in batch:
                        job_id = str(message.job_id)
                        task_message, sent_event = create_task_message(
                            self._app,
                            job_id,
                            message.task_name,
                            [job_id],
                            origin=origin,
                            reply_to=reply_to,
                            sent_event=self._sent_events,
                        )
                        send_task_message(
                            self._app,
                            producer,
                            message.task_name,
                            task_message,
                            queue=message.queue,
                            priority=self._broker_priority(message.priority),
                            headers=_headers(message),
                            # None: Celery's own choice (the queue), once per queue.
                            declare=[] if message.queue in declared else None,
                            **self._options,
                        )
                        declared.add(message.queue)
                        if sent_event is not None:
                            events.append(
                                {
                                    **sent_event,
                                    "queue": message.queue,
                                    "exchange": "",
                                    "routing_key": message.queue,
                                }
                            )
                    self._events.publish(producer, events)
            except (KombuError, RedisError, AMQPError, MessageNacked, OSError) as exc:
                # A pipeline that failed midway leaves its connection unusable, and the pool
                # would hand it out again: drop it, so the next publish connects afresh.
                with contextlib.suppress(Exception):
                    discard_connection(producer.connection)
                # Kombu, redis-py and sockets each have their own errors, and a failed
                # batch says "delivery is uncertain": callers see one exception for all.
                raise PublishFailed(f"the broker did not take the messages: {exc}") from exc
