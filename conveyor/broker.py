"""The Celery configuration shared by the API (which only publishes) and the worker."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from amqp.exceptions import AMQPError, MessageNacked
from celery import Celery
from kombu.exceptions import KombuError
from redis import Redis
from redis.exceptions import RedisError

from conveyor.celery_internals import (
    UNACKED_KEY,
    TaskSentEvents,
    create_task_message,
    discard_connection,
    send_task_message,
    sender_identity,
    unacked_messages,
)
from conveyor.errors import PublishFailed
from conveyor.settings import Settings

PRIORITY_LEVELS = range(10)
PRIORITY_SEPARATOR = ":"
# Broker commands buffered per round trip when publishing many jobs at once.
PUBLISH_BATCH = 500
# Seconds an AMQP publish waits for RabbitMQ's confirm before it counts as failed.
CONFIRM_TIMEOUT = 5.0


def create_celery(settings: Settings, *, name: str) -> Celery:
    """Build a Celery app with Conveyor's reliability settings; connects to nothing yet.

    No result backend: results live in the ledger and live views in Conveyor's own Redis
    keys (`conveyor.live.store`). A backend would cost a worker round trips per job and a
    publishing process ~20% of its enqueue rate (PITFALLS.md).
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
        # reconciler re-drives those jobs from the ledger (README, "Choosing a broker").
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

    @classmethod
    def of(cls, job: Publishable, request_id: str | None = None) -> Message:
        """Return the message that runs `job`."""
        return cls(job.id, job.type, job.queue, job.priority, request_id)


# The Celery message header carrying the request id; the worker binds it to its log lines.
REQUEST_ID_HEADER = "conveyor_request_id"


def queue_lists(queue: str) -> list[str]:
    """Return the Redis lists kombu keeps for a queue, one per priority level.

    Named as Celery's routing guide documents ("Redis Message Priorities"): the queue's own
    name for level 0, then the separator and the level.
    """
    return [f"{queue}{PRIORITY_SEPARATOR}{n}" if n else queue for n in PRIORITY_LEVELS]


def queue_depth(redis: Redis, queue: str) -> int:
    """Count the messages waiting in a Redis-broker queue, over all its priority lists."""
    with redis.pipeline(transaction=False) as pipe:
        for name in queue_lists(queue):
            pipe.llen(name)
        return sum(pipe.execute())


def broker_task_ids(
    redis: Redis, queues: Iterable[str], limit: int, *, delivered_since: float | None = None
) -> set[str] | None:
    """Return the ids of every task waiting in or delivered from these Redis-broker queues.

    Reads the priority lists and kombu's `unacked` hash. With `delivered_since` (a Unix
    time), unacked messages delivered before it are left out: a queued job whose message a
    consumer took that long ago and never claimed was taken by a consumer that died, and
    Redis would only give it back after the visibility timeout (hours). `None` when there
    are more than `limit` messages: too many to read on a housekeeping pass, so nothing can
    be concluded.
    """
    names = [name for queue in queues for name in queue_lists(queue)]
    with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        pipe.hlen(UNACKED_KEY)
        sizes = pipe.execute()
    if sum(sizes) > limit:
        return None
    raw: list[bytes | str] = []
    for name, size in zip(names, sizes, strict=False):
        if size:
            raw.extend(redis.lrange(name, 0, -1))
    unacked = unacked_messages(redis, delivered_since=delivered_since)
    messages = [json.loads(body) for body in raw] + unacked
    # Task protocol 2 carries the task id in the message headers.
    return {str(m.get("headers", {}).get("id")) for m in messages}


def _headers(message: Message) -> dict[str, str] | None:
    return {REQUEST_ID_HEADER: message.request_id} if message.request_id else None


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
        with self._app.producer_or_acquire() as producer:
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
