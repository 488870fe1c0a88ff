"""The worker's event-loop timer keeps no entry for jobs that already finished."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kombu.asynchronous import Hub
from kombu.asynchronous.timer import Timer

from conveyor.broker.internals import purge_cancelled
from conveyor.settings import Settings
from tests.conftest import wait_for
from worker import timers
from worker.app import create_celery_app
from worker.timers import PurgeCancelledTimers

JOBS = 10_000
# The sweep runs every PURGE_INTERVAL seconds; here, every SWEEP_EVERY jobs stands in for it.
SWEEP_EVERY = 500
# Celery's prefork pool arms one entry per job for its hard time limit (30 minutes here).
TIME_LIMIT = 1800.0


def _noop(_: int) -> None:
    pass


def test_finished_jobs_time_limits_stay_bounded_and_live_ones_stay() -> None:
    timer = Timer()
    still_running = timer.call_after(TIME_LIMIT, _noop, (-1,))
    largest = 0
    for job in range(JOBS):
        # What the pool does per job: arm the time limit, then cancel it when the job ends.
        timer.call_after(TIME_LIMIT, _noop, (job,)).cancel()
        if job % SWEEP_EVERY == SWEEP_EVERY - 1:
            purge_cancelled(timer)
        largest = max(largest, len(timer))
    assert largest <= SWEEP_EVERY + 1
    assert purge_cancelled(timer) == 0
    # The job still running keeps its time limit, still the first to come due.
    assert len(timer) == 1
    assert timer.queue[0].entry is still_running


def test_the_worker_step_schedules_the_sweep_on_its_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(timers, "PURGE_INTERVAL", 0.001)  # due at once, not in 10 s
    hub = Hub(Timer())
    worker = SimpleNamespace(use_eventloop=True, hub=hub)
    step = PurgeCancelledTimers(worker)
    assert step.include_if(worker)
    step.create(worker)
    (sweep,) = [event.entry for event in hub.timer.queue]
    for job in range(JOBS):
        hub.call_later(TIME_LIMIT, _noop, job).cancel()
    assert len(hub.timer) == JOBS + 1

    def turn_of_the_loop() -> bool:
        hub.fire_timers()  # what the event loop does between two polls
        return len(hub.timer) == 1

    wait_for(turn_of_the_loop, timeout=5, interval=0.001)
    # Only the sweep itself, rescheduled, is left.
    assert [event.entry for event in hub.timer.queue] == [sweep]


def test_workers_without_an_event_loop_skip_the_sweep() -> None:
    assert not PurgeCancelledTimers(SimpleNamespace(hub=None)).include_if(
        SimpleNamespace(use_eventloop=False, hub=None)
    )


def test_the_worker_app_installs_the_sweep(base_settings: Settings) -> None:
    app = create_celery_app(base_settings)
    assert PurgeCancelledTimers in app.steps["worker"]
