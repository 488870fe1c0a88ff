"""A thread-pool worker changes its prefetch count only from its event loop."""

from __future__ import annotations

import threading

from kombu.asynchronous import Hub
from kombu.utils.imports import symbol_by_name

from conveyor.settings import Settings
from worker.app import create_celery_app
from worker.consumer import LoopBoundConsumer


def test_the_worker_app_runs_the_loop_bound_consumer(base_settings: Settings) -> None:
    app = create_celery_app(base_settings)
    try:
        assert symbol_by_name(app.conf.worker_consumer) is LoopBoundConsumer
    finally:
        app.conveyor.engine.dispose()


def test_a_pool_thread_hands_the_prefetch_restore_to_the_event_loop() -> None:
    # Celery's restore step sends basic.qos and waits for the reply: record where it runs.
    ran_in: list[int] = []
    consumer = LoopBoundConsumer.__new__(LoopBoundConsumer)  # no app, connection or pool
    consumer.hub = Hub()
    try:
        # What a thread pool does when a job received after a reconnect is acknowledged.
        pool_thread = threading.Thread(
            target=consumer.schedule_prefetch_restore,
            args=(lambda: ran_in.append(threading.get_ident()),),
        )
        pool_thread.start()
        pool_thread.join()
        assert ran_in == []
        next(consumer.hub.create_loop())  # one turn of the worker's event loop
        assert ran_in == [threading.get_ident()]
    finally:
        consumer.hub.close()


def test_without_an_event_loop_the_restore_runs_at_once() -> None:
    ran: list[str] = []
    consumer = LoopBoundConsumer.__new__(LoopBoundConsumer)
    consumer.hub = None  # the solo pool without an event loop, gevent, eventlet
    consumer.schedule_prefetch_restore(lambda: ran.append("restored"))
    assert ran == ["restored"]
