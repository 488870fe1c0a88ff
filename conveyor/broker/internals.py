"""Every use of Celery, kombu and py-amqp beyond their documented API, one function or class each.

Conveyor reaches past the libraries' documented surface in a few places: to publish jobs in
batches (the API, beat's housekeeping), to keep a thread-pool worker's connection in one
thread, to keep the worker's timer from hoarding memory, to read the Redis broker for the
reconciler, and to drive in-process workers in tests. Each such use lives here, saying what
it relies on, why no public API does it, and that it was checked against celery 5.7.0,
kombu 5.7.0 and py-amqp 5.4.2. `tests/test_celery_internals.py` checks each one and names
it when an upgrade changes it; nothing outside this module may reach for them.

Before widening `celery>=5.7,<6` (pyproject.toml), or moving celery, kombu or amqp in
uv.lock (celery 5.7 accepts any kombu>=5.7): install the new versions, run
`tests/test_celery_internals.py` (with `CONVEYOR_TEST_AMQP_URL` set too), then re-read each
docstring below against the new source, since a signature can survive while the behaviour
moves (Celery fixing the prefetch restore's thread, or kombu dropping cancelled timer
entries itself, would make a workaround here dead code); then run `tests/test_publish.py`,
`tests/test_consumer.py`, `tests/test_timers.py` and `tests/test_worker.py`.

Judged public, and so used in place: `Celery.send_task`, `connection_for_read/write`,
`producer_or_acquire`, `amqp.queues`, `control`, `events.Dispatcher(enabled=...)`, a task's
`request.headers` (custom headers included), the bootsteps API (`app.steps`, `requires`,
`include_if`, `create`, a worker's `hub`, `timer` and `use_eventloop`, a consumer's `hub`
and `task_consumer`: Celery's "Extensions and Bootsteps" guide), the `worker_consumer`
setting, `celery.bin.celery.main`, `kombu.Connection.declared_entities` (in kombu's
reference), `Producer.batch` (kombu 5.7.0, documented in its source), `kombu.asynchronous`'s
`Hub` and `Timer.queue`, the Redis priority lists `queue`, `queue<sep>N` (Celery's routing
guide) and the batched `task.multi` event message (Celery's message protocol).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, cast

from celery import Celery
from celery.events.event import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu import Connection, Producer
from redis import Redis

if TYPE_CHECKING:
    from celery.events.dispatcher import EventDispatcher
    from kombu.asynchronous.timer import Timer

# kombu's Redis transport keeps each delivered, not yet acknowledged message in this hash,
# keyed by delivery tag, and the tag's delivery time in this sorted set. They are the
# defaults of its `unacked_key` and `unacked_index_key` options, which Conveyor leaves unset.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
# Celery's private consumer method that PrefetchRestoreHook overrides.
_RESTORE_PREFETCH = "_restore_prefetch_count_after_connection_restart"


# Publishing: what `Celery.send_task` does per message, done once per batch.


def sender_identity(app: Celery) -> tuple[str, str]:
    """Return the `origin` and `reply_to` that `send_task` stamps on a message from this thread.

    Relies on `celery.utils.nodenames.anon_nodename()` (a module of Celery's internal
    reference) and `Celery.thread_oid` (undocumented: only `oid` is), as `send_task` uses
    them in 5.7.0. No public API returns them: `send_task` works them out per message.
    """
    return anon_nodename(), app.thread_oid


def create_task_message(
    app: Celery,
    task_id: str,
    name: str,
    args: list[str],
    *,
    origin: str,
    reply_to: str,
    sent_event: bool,
) -> tuple[Any, dict[str, Any] | None]:
    """Build the message `send_task` would (no result wanted); return it and its `task-sent` event.

    Relies on `app.amqp.create_task_message` (protocol 2's `AMQP.as_task_v2`: listed in the
    `celery.app.amqp` reference, its keywords are not) and on the undocumented `task_message`
    namedtuple it returns, `(headers, properties, body, sent_event)`, as of 5.7.0. The event
    is split off so a batch sends all its events in one message. No public API builds a
    message without sending it.
    """
    message = app.amqp.create_task_message(
        task_id,
        name,
        args,
        {},
        reply_to=reply_to,
        origin=origin,
        ignore_result=True,
        # saferepr of a short list of strings, without its cost.
        argsrepr=repr(args),
        kwargsrepr="{}",
        create_sent_event=sent_event,
    )
    return message._replace(sent_event=None), message.sent_event


def send_task_message(
    app: Celery,
    producer: Producer,
    name: str,
    message: Any,
    *,
    queue: str,
    declare: list[Any] | None,
    **options: Any,
) -> None:
    """Send a message from `create_task_message` through `producer`, routed as `send_task` would.

    Relies on `app.amqp.send_task_message(producer, name, message, queue=, headers=,
    declare=, confirm_timeout=, **properties)` in 5.7.0: `declare=None` declares the queue,
    `declare=[]` nothing, other keywords (`priority`) become message properties, and the
    `before_task_publish` signal fires as for `send_task`. No public API sends a prepared
    message: `send_task` routes and declares per message, and may pick another producer.
    """
    app.amqp.send_task_message(producer, name, message, queue=queue, declare=declare, **options)


class TaskSentEvents:
    """Publishes `task-sent` events as one list message, as a worker flushes its task events."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    @cached_property
    def _dispatcher(self) -> EventDispatcher:
        # Disabled: it only lends its exchange and settings; events go through the caller's
        # producer, in the caller's batch.
        dispatcher: EventDispatcher = self._app.events.Dispatcher(enabled=False)
        return dispatcher

    def publish(self, producer: Producer, fields: list[dict[str, Any]]) -> None:
        """Send one `task-sent` event per entry of `fields`, in a single `task.multi` message.

        The list body on routing key `task.multi` is documented (Celery's message protocol,
        "Event Messages"). What builds each event is not: `EventDispatcher`'s instance
        attributes `hostname`, `pid`, `exchange`, `serializer`, `headers` and
        `delivery_mode`, `celery.utils.time.utcoffset` (internal reference) and the
        undocumented `Celery.clock`, all as `EventDispatcher.publish` uses them in 5.7.0.
        The public `EventDispatcher.send` batches only into its own producer and connection,
        outside the caller's pipelined batch, and `publish` sends one message per event.
        """
        if not fields:
            return
        dispatcher = self._dispatcher
        events = [
            Event(
                "task-sent",
                hostname=dispatcher.hostname,
                utcoffset=utcoffset(),
                pid=dispatcher.pid,
                clock=self._app.clock.forward(),
                **event,
            )
            for event in fields
        ]
        producer.publish(
            events,
            routing_key="task.multi",
            exchange=dispatcher.exchange.name,
            declare=[dispatcher.exchange],
            serializer=dispatcher.serializer,
            headers=dispatcher.headers,
            delivery_mode=dispatcher.delivery_mode,
        )


def discard_connection(connection: Connection) -> None:
    """Drop a broker connection's socket and state without a word to the broker.

    After a failed pipelined publish the connection is unusable and its pool would hand it
    out again; once discarded, its next use connects afresh. Relies on
    `kombu.Connection.collect()` (5.7.0: closes the transport without a handshake, clears
    `declared_entities`, forgets the socket), which kombu's reference does not list (its
    pools call it after a fork). `release()` would talk to a broker that just failed.
    """
    connection.collect()


# kombu's Redis transport, read by the reconciler and driven by tests.


def unacked_messages(redis: Redis, *, delivered_since: float | None = None) -> list[dict[str, Any]]:
    """Return the messages kombu's Redis transport delivered and saw no acknowledgement for.

    With `delivered_since` (a Unix time), only those delivered since then. Relies on the
    layout kombu 5.7.0's `kombu.transport.redis.QoS.append` writes: `UNACKED_KEY` maps a
    delivery tag to the JSON `[message, exchange, routing_key]`, and `UNACKED_INDEX_KEY`
    scores each tag with its delivery time (`time.time()`). The option names are
    documented, their default values and the layout are not, and no kombu call lists the
    deliveries other consumers hold.
    """
    if delivered_since is None:
        entries = redis.hvals(UNACKED_KEY)
    else:
        tags = cast("list[bytes]", redis.zrangebyscore(UNACKED_INDEX_KEY, delivered_since, "+inf"))
        entries = [e for e in (redis.hmget(UNACKED_KEY, tags) if tags else []) if e is not None]
    return [json.loads(entry)[0] for entry in entries]


def restore_overdue_unacked(connection: Connection, limit: int = 100) -> None:
    """Requeue, now, up to `limit` unacked messages older than the connection's visibility timeout.

    What a worker's Redis transport does on its own timer (every `unacked_restore_interval`
    seconds); tests and drills call it to redeliver without waiting. Relies on
    `connection.default_channel.qos.restore_visible(num=, interval=)` of kombu 5.7.0's Redis
    transport, where `interval` throttles it to one scan every `interval` calls (1: each
    call). No public API triggers the restore.
    """
    connection.default_channel.qos.restore_visible(num=limit, interval=1)


# The worker.


def purge_cancelled(timer: Timer) -> int:
    """Remove the cancelled entries from `timer`'s heap; return how many went.

    A cancelled entry never runs (the timer skips it when it comes due), so dropping it
    early changes nothing but memory. Relies on kombu 5.7.0's `Timer._queue`: the heap of
    `scheduled(eta, priority, entry)` tuples that keeps cancelled entries until they come
    due, and that `Timer.__iter__` (the event loop's scheduler) binds once, so the list is
    rebuilt in place. Kombu offers no way to drop cancelled entries (`Timer.queue` is a copy).
    """
    queue: list[Any] = timer._queue
    live = [event for event in queue if not event.entry.canceled]
    removed = len(queue) - len(live)
    if removed:
        heapq.heapify(live)
        queue[:] = live
    return removed


class PrefetchRestoreHook:
    """Mixin for a Celery `Consumer` subclass: its prefetch-count restore steps go through one hook.

    After a reconnect with jobs still running, Celery 5.7.0 cuts the prefetch count and
    restores it a step at a time: the task handler `Consumer.create_task_handler` builds
    chains `self._restore_prefetch_count_after_connection_restart(p, *args)` to each
    acknowledgement, which runs it in the acknowledging thread. This mixin overrides that
    private method to hand each step to `schedule_prefetch_restore`. No public API chooses
    that thread; `worker_enable_prefetch_count_reduction=False` avoids the steps but lets a
    reconnected worker prefetch a full count on top of the jobs it still runs.
    """

    def _restore_prefetch_count_after_connection_restart(self, p: Any, *args: Any) -> None:
        restore = getattr(super(), _RESTORE_PREFETCH)
        self.schedule_prefetch_restore(partial(restore, p, *args))

    def schedule_prefetch_restore(self, restore: Callable[[], None]) -> None:
        """Run one step of Celery's prefetch restore; a subclass picks the thread."""
        restore()


def worker_task_channel(worker: Any) -> Any:
    """Return the broker channel a running `WorkController` consumes its tasks on.

    Relies on `WorkController.consumer`, which the worker blueprint's Consumer step sets
    (`celery.worker.components.Consumer.create`, 5.7.0) but which is not among the
    documented worker attributes; the consumer's `task_consumer` is documented.
    """
    return worker.consumer.task_consumer.channel


def reset_worker_shutdown_flag() -> None:
    """Clear the process-wide flag that stops every in-process worker of this process.

    `celery.contrib.testing.worker.start_worker` stops its worker by setting
    `celery.worker.state.should_terminate` and leaves it set when the worker thread
    outstays `shutdown_timeout`; every later worker would then stop before it is ready.
    Relies on that module global (5.7.0; not in the module's `__all__`), which
    `state.maybe_shutdown()` reads. No public API clears it.
    """
    # Imported here: only a process running a worker needs the worker's state.
    from celery.worker import state

    state.should_terminate = None
