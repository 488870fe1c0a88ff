"""A thread-pool worker changes its prefetch count only from its event loop."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from celery.worker.consumer import Consumer
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
    # The method it overrides is Celery's, private: an upgrade that renames it fails here.
    assert callable(Consumer._restore_prefetch_count_after_connection_restart)


def test_a_pool_thread_hands_the_prefetch_restore_to_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Celery's restore sends basic.qos and waits for the reply: record where it runs instead.
    ran_in: list[int] = []

    def restore(consumer: Consumer, p: Any, *args: Any) -> None:
        ran_in.append(threading.get_ident())

    monkeypatch.setattr(Consumer, "_restore_prefetch_count_after_connection_restart", restore)
    consumer = LoopBoundConsumer.__new__(LoopBoundConsumer)  # no app, connection or pool
    consumer.hub = Hub()
    try:
        # What a thread pool does when a job received after a reconnect is acknowledged.
        pool_thread = threading.Thread(
            target=consumer._restore_prefetch_count_after_connection_restart, args=(None,)
        )
        pool_thread.start()
        pool_thread.join()
        assert ran_in == []
        next(consumer.hub.create_loop())  # one turn of the worker's event loop
        assert ran_in == [threading.get_ident()]
    finally:
        consumer.hub.close()


def test_without_an_event_loop_the_restore_runs_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[Any] = []
    monkeypatch.setattr(
        Consumer,
        "_restore_prefetch_count_after_connection_restart",
        lambda consumer, p, *args: ran.append(p),
    )
    consumer = LoopBoundConsumer.__new__(LoopBoundConsumer)
    consumer.hub = None  # the solo pool without an event loop, gevent, eventlet
    consumer._restore_prefetch_count_after_connection_restart("promise")
    assert ran == ["promise"]
