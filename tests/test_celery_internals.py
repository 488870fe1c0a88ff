"""Each Celery/kombu internal that `conveyor.broker.internals` relies on still holds.

A failure names what an upgrade changed and which use it breaks; the module's docstring says
what else to re-check before widening the Celery pin. The publisher's messages are compared
byte for byte with `send_task`'s in `tests/test_publish.py`; the consumer's and the timer
sweep's own behaviour is in `tests/test_consumer.py` and `tests/test_timers.py`.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing import worker as testing_worker
from celery.exceptions import WorkerTerminate
from celery.worker import state
from celery.worker.consumer import Consumer
from kombu import Connection, Producer
from kombu.asynchronous import Hub
from kombu.asynchronous.timer import Timer
from kombu.clocks import LamportClock
from redis import Redis

from conveyor.broker.config import PRIORITY_LEVELS, create_celery
from conveyor.broker.inspect import broker_task_ids, queue_depth, queue_lists
from conveyor.broker.internals import (
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    PrefetchRestoreHook,
    create_task_message,
    discard_connection,
    purge_cancelled,
    reset_worker_shutdown_flag,
    restore_overdue_unacked,
    send_task_message,
    sender_identity,
    unacked_messages,
    worker_task_channel,
)
from conveyor.broker.publisher import CeleryPublisher, Message
from conveyor.settings import Settings
from tests.conftest import fresh_queue, in_process_worker

RESTORE_PREFETCH = "_restore_prefetch_count_after_connection_restart"


def require_parameters(function: Callable[..., Any], *names: str, used_by: str) -> None:
    """Fail, naming `used_by`, unless `function` still takes each of `names`."""
    parameters = inspect.signature(function).parameters
    missing = [name for name in names if name not in parameters]
    assert not missing, f"{function.__qualname__} no longer takes {missing}: {used_by} breaks"


@pytest.fixture
def app(settings: Settings) -> Iterator[Celery]:
    """Yield a publishing-only Celery app built as Conveyor builds them, on the test's broker."""
    app = create_celery(settings, name="internals")
    yield app
    app.close()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """Record every `Producer.publish` as (body, keywords), sending nothing to the broker."""
    sent: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(Producer, "publish", lambda _, body, **kw: sent.append((body, kw)))
    return sent


# Publishing.


def test_the_sender_identity_is_per_thread_as_send_task_uses_it(app: Celery) -> None:
    origin, reply_to = sender_identity(app)
    assert isinstance(origin, str)
    assert "@" in origin, "anon_nodename() is no longer a node name: sender_identity breaks"
    assert isinstance(reply_to, str)
    assert sender_identity(app)[1] == reply_to, "Celery.thread_oid changes between calls"
    other: list[str] = []
    thread = threading.Thread(target=lambda: other.append(sender_identity(app)[1]))
    thread.start()
    thread.join()
    assert other[0] != reply_to, "Celery.thread_oid is no longer per thread"


def test_create_task_message_keeps_its_keywords_and_its_tuple(app: Celery) -> None:
    keywords = ("task_id", "name", "args", "kwargs", "reply_to", "origin", "ignore_result")
    keywords += ("argsrepr", "kwargsrepr", "create_sent_event")
    require_parameters(
        app.amqp.create_task_message, *keywords, used_by="celery_internals.create_task_message"
    )
    task_id = str(uuid.uuid4())
    message, event = create_task_message(
        app, task_id, "system.noop", [task_id], origin="o", reply_to="r", sent_event=True
    )
    assert type(message)._fields == ("headers", "properties", "body", "sent_event"), (
        "celery.app.amqp.task_message changed shape: create_task_message breaks"
    )
    assert message.sent_event is None
    assert message.headers["id"] == task_id
    assert message.headers["origin"] == "o"
    assert message.properties["reply_to"] == "r"
    assert event is not None
    assert (event["uuid"], event["name"]) == (task_id, "system.noop")
    _, no_event = create_task_message(
        app, task_id, "system.noop", [task_id], origin="o", reply_to="r", sent_event=False
    )
    assert no_event is None


def test_send_task_message_keeps_its_keywords(
    app: Celery, captured: list[tuple[Any, dict[str, Any]]]
) -> None:
    sender = app.amqp.send_task_message
    keywords = ("producer", "name", "message", "queue", "headers", "declare", "confirm_timeout")
    require_parameters(sender, *keywords, used_by="celery_internals.send_task_message")
    kinds = {p.kind for p in inspect.signature(sender).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD in kinds, "send_task_message takes no message properties"
    task_id = str(uuid.uuid4())
    message, _ = create_task_message(
        app, task_id, "system.noop", [task_id], origin="o", reply_to="r", sent_event=False
    )
    with app.producer_or_acquire() as producer:
        send_task_message(
            app, producer, "system.noop", message, queue="q", declare=[], priority=3, headers={}
        )
    ((body, sent),) = captured
    assert (sent["routing_key"], sent["priority"], sent["declare"]) == ("q", 3, [])
    assert body == message.body


@pytest.mark.brokers
def test_task_sent_events_are_the_ones_celery_sends(
    app: Celery, captured: list[tuple[Any, dict[str, Any]]]
) -> None:
    assert isinstance(app.clock, LamportClock), "Celery.clock is gone: TaskSentEvents breaks"
    job_id = uuid.uuid4()
    app.send_task("system.noop", args=[str(job_id)], task_id=str(job_id), queue="q")
    CeleryPublisher(app).publish([Message(job_id, "system.noop", "q")])
    (celery_event, celery_kw) = next(
        (b, kw) for b, kw in captured if kw["routing_key"] == "task.sent"
    )
    (ours, our_kw) = next((b, kw) for b, kw in captured if kw["routing_key"] == "task.multi")
    assert len(ours) == 1
    assert set(ours[0]) == set(celery_event), "Celery's task-sent event has other fields now"
    moving = {"clock", "timestamp"}
    assert {k: v for k, v in ours[0].items() if k not in moving} == {
        k: v for k, v in celery_event.items() if k not in moving
    }
    for key in ("exchange", "serializer", "headers", "delivery_mode"):
        assert our_kw[key] == celery_kw[key], f"EventDispatcher.{key} is not what Celery sends"
    assert [e.name for e in our_kw["declare"]] == [e.name for e in celery_kw["declare"]]


def test_celery_workers_still_send_task_events_as_task_multi_lists(
    app: Celery, captured: list[tuple[Any, dict[str, Any]]]
) -> None:
    # The format TaskSentEvents imitates: while Celery's own workers send it, its receivers
    # (Flower) read it.
    with app.connection_for_write() as conn:
        dispatcher = app.events.Dispatcher(conn, buffer_group={"task"}, buffer_limit=2)
        try:
            dispatcher.send("task-received", uuid="a")
            dispatcher.send("task-started", uuid="a")
        finally:
            dispatcher.close()
    ((body, sent),) = captured
    assert sent["routing_key"] == "task.multi", "Celery batches task events elsewhere now"
    assert [event["type"] for event in body] == ["task-received", "task-started"]


@pytest.mark.brokers
def test_a_discarded_connection_connects_afresh_on_next_use(app: Celery) -> None:
    require_parameters(
        Connection.collect, "socket_timeout", used_by="celery_internals.discard_connection"
    )
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        conn.declared_entities.add("stale")
        discard_connection(conn)
        assert not conn.connected, "Connection.collect() no longer drops the connection"
        assert not conn.declared_entities
        conn.ensure_connection(max_retries=1)
        assert conn.connected


# kombu's Redis transport.


def test_kombu_keeps_redis_messages_where_the_reconciler_reads_them(
    app: Celery, base_settings: Settings, redis_client: Redis
) -> None:
    queue = fresh_queue(base_settings, "layout")
    ids = {priority: uuid.uuid4() for priority in PRIORITY_LEVELS}
    CeleryPublisher(app).publish(
        Message(job_id, "system.noop", queue, priority) for priority, job_id in ids.items()
    )
    try:
        # One list per priority level, named as queue_lists names them; 9 first, unsuffixed.
        assert [redis_client.llen(name) for name in queue_lists(queue)] == [1] * 10
        (first,) = redis_client.lrange(queue_lists(queue)[0], 0, -1)
        assert json.loads(first)["headers"]["id"] == str(ids[9])
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            assert channel.queue_declare(queue, passive=True).message_count == 10
            before = time.time()
            taken = channel.basic_get(queue, no_ack=False)
            assert taken is not None
            assert taken.headers["id"] == str(ids[9])
            tag = taken.delivery_tag
            entry = redis_client.hget(UNACKED_KEY, tag)
            assert entry is not None, f"kombu keeps unacked messages elsewhere than {UNACKED_KEY}"
            assert json.loads(entry)[1:] == ["", queue], "an unacked entry changed shape"
            score = redis_client.zscore(UNACKED_INDEX_KEY, tag)
            assert score is not None, (
                f"kombu indexes unacked messages elsewhere: {UNACKED_INDEX_KEY}"
            )
            assert before <= score <= time.time(), "the unacked index no longer holds Unix times"
            since = [
                m["headers"]["id"] for m in unacked_messages(redis_client, delivered_since=before)
            ]
            assert str(ids[9]) in since
            later = unacked_messages(redis_client, delivered_since=time.time() + 60)
            assert str(ids[9]) not in [m["headers"]["id"] for m in later]
            present = broker_task_ids(redis_client, [queue], limit=100_000)
            assert present is not None
            assert {str(job_id) for job_id in ids.values()} <= present
            # Delivered two hours ago: past an hour's visibility timeout, so it goes back.
            redis_client.zadd(UNACKED_INDEX_KEY, {tag: time.time() - 7200})
            options = {**app.conf.broker_transport_options, "visibility_timeout": 3600}
            with Connection(app.conf.broker_url, transport_options=options) as other:
                restore_overdue_unacked(other)
            assert redis_client.hget(UNACKED_KEY, tag) is None, "restore_visible left it unacked"
            assert queue_depth(redis_client, queue) == 10
    finally:
        redis_client.delete(*queue_lists(queue))


# The worker.


def _noop() -> None:
    pass


def test_kombu_keeps_cancelled_timer_entries_in_its_heap() -> None:
    timer = Timer()
    heap = getattr(timer, "_queue", None)
    assert isinstance(heap, list), "kombu's Timer._queue is gone: purge_cancelled breaks"
    entry = timer.call_after(3600, _noop)
    entry.cancel()
    # If kombu dropped it at cancel, worker/timers.py's sweep would be dead code: remove it.
    assert [event.entry for event in heap] == [entry], "kombu drops cancelled entries now"
    assert heap[0]._fields == ("eta", "priority", "entry")


def test_the_purge_keeps_the_list_the_event_loop_reads() -> None:
    hub = Hub(Timer())
    timer = hub.timer
    heap = timer._queue
    entries = [timer.call_after(float(n), _noop) for n in range(100, 0, -1)]
    for entry in entries[::2]:
        entry.cancel()
    hub.fire_timers()  # the loop's scheduler binds the timer's list at its first turn
    assert purge_cancelled(timer) == 50
    assert timer._queue is heap, "purge_cancelled replaced the list the event loop holds"
    etas = [event.eta for event in timer.queue]  # popped off a copy: a broken heap misorders
    assert len(etas) == 50
    assert etas == sorted(etas)
    assert not any(event.entry.canceled for event in timer.queue)
    # An entry armed after the purge is one the event loop still runs.
    ran: list[str] = []
    timer.call_at(0, ran.append, ("due",))
    hub.fire_timers()
    assert ran == ["due"], "the event loop no longer reads Timer._queue in place"


def test_celery_restores_prefetch_through_the_method_the_hook_overrides(app: Celery) -> None:
    method = getattr(Consumer, RESTORE_PREFETCH, None)
    assert method is not None, f"Consumer.{RESTORE_PREFETCH} is gone: PrefetchRestoreHook breaks"
    parameters = list(inspect.signature(method).parameters.values())
    assert [p.name for p in parameters[:2]] == ["self", "p"]
    assert parameters[2].kind is inspect.Parameter.VAR_POSITIONAL
    assert f"self.{RESTORE_PREFETCH}" in inspect.getsource(Consumer.create_task_handler), (
        "Celery's task handler no longer restores the prefetch count through the overridable "
        "method: LoopBoundConsumer no longer sees the steps"
    )
    assert app.conf.worker_enable_prefetch_count_reduction is True, (
        "Celery no longer cuts the prefetch count after a reconnect: LoopBoundConsumer may go"
    )


def test_the_hook_receives_each_restore_step_before_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, tuple[Any, ...]]] = []
    steps: list[Callable[[], None]] = []

    def restore(consumer: Consumer, p: Any, *args: Any) -> None:
        calls.append((p, args))

    monkeypatch.setattr(Consumer, RESTORE_PREFETCH, restore)

    class Probe(PrefetchRestoreHook, Consumer):
        def schedule_prefetch_restore(self, restore: Callable[[], None]) -> None:
            steps.append(restore)

    probe = Probe.__new__(Probe)  # no app, connection or pool
    getattr(probe, RESTORE_PREFETCH)("promise", 1)
    assert calls == []
    (step,) = steps
    step()
    assert calls == [("promise", (1,))]


@pytest.mark.brokers
def test_a_running_worker_shows_the_channel_it_consumes_on(settings: Settings) -> None:
    mine = settings.model_copy(update={"default_queue": fresh_queue(settings, "internals")})
    app = create_celery(mine, name="internals-worker")
    try:
        with in_process_worker(app) as running:
            channel = worker_task_channel(running)
            assert channel.connection is not None, "the task consumer's channel is closed"
            assert callable(channel.basic_ack), "WorkController.consumer no longer consumes tasks"
    finally:
        app.close()


def test_the_worker_shutdown_flag_is_the_one_start_worker_sets() -> None:
    assert "state.should_terminate = 0" in inspect.getsource(testing_worker), (
        "start_worker stops its worker another way: reset_worker_shutdown_flag is moot"
    )
    try:
        state.should_terminate = 0
        with pytest.raises(WorkerTerminate):
            state.maybe_shutdown()
        reset_worker_shutdown_flag()
        state.maybe_shutdown()  # cleared: a worker started now would run
    finally:
        reset_worker_shutdown_flag()


# Every reach into the libraries' internals stays in conveyor/broker/internals.py.
INTERNALS = {
    r"\._queue\b": "kombu's Timer heap",
    RESTORE_PREFETCH: "Celery's consumer prefetch restore",
    r"\.thread_oid\b": "Celery.thread_oid",
    r"amqp\.(create|send)_task_message": "Celery's message builder and sender",
    r"_replace\(sent_event": "Celery's task_message tuple",
    r"connection\.collect\(": "kombu.Connection.collect",
    r"[\"']unacked(_index)?[\"']": "kombu's Redis unacked keys",
    r"restore_visible": "kombu's Redis restore sweep",
    r"should_terminate": "celery.worker.state's stop flag",
    r"celery\.utils\.(nodenames|time)": "Celery's internal utilities",
    r"\.clock\.forward": "Celery.clock",
    r"\.consumer\.task_consumer": "WorkController.consumer",
}
SCANNED = ("api", "bench", "conveyor", "domains", "migrations", "tests", "worker")
ALLOWED = {Path("conveyor/broker/internals.py"), Path("tests/test_celery_internals.py")}


def test_no_code_outside_the_module_reaches_into_celery_internals() -> None:
    root = Path(__file__).resolve().parents[1]
    found = []
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            relative = path.relative_to(root)
            if relative in ALLOWED:
                continue
            text = path.read_text()
            found += [
                f"{relative}: {what}"
                for pattern, what in INTERNALS.items()
                if re.search(pattern, text)
            ]
    assert not found, f"move these into conveyor/broker/internals.py, with a test: {found}"
