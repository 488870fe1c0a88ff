"""Beat's housekeeping, in a thread of the beat process, run by one leader at a time.

It runs inside beat rather than as tasks on the job queues, so workers whose every process
is busy with long jobs cannot starve it. Leadership is a PostgreSQL advisory lock held on
a connection of its own: a second beat waits, and takes over on its next pass once the
leader's connection is gone. Every task is batched, bounded and idempotent, so even two
leaders at once (a network partition) would do no harm: promotion skips locked rows and a
schedule occurrence has a unique key on its job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery
from redis import Redis
from sqlalchemy.engine import RowMapping

from conveyor.broker.inspect import broker_task_ids
from conveyor.ledger.upkeep import (
    expire_due,
    promote_due,
    reap_stale,
    redrive,
    stale_queued,
    stop_overdue,
)
from conveyor.queues import broker_depths
from conveyor.retention import prune
from conveyor.schedules import fire_due_schedules
from conveyor.telemetry.metrics import JOBS_FINISHED, JOBS_REDRIVEN, SCHEDULE_FIRES_SKIPPED
from worker.dispatcher import Dispatcher
from worker.leadership import Leadership
from worker.runner import WorkerServices, utcnow

logger = logging.getLogger(__name__)
TICK = 0.1


@dataclass
class Housekeeper:
    """Runs housekeeping tasks on demand, or each on its interval on a daemon thread."""

    services: WorkerServices
    app: Celery
    dispatcher: Dispatcher
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _redis: Redis | None = None
    stats: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_app(cls, app: Celery) -> Housekeeper:
        """Build a housekeeper publishing through the worker app."""
        return cls(app.conveyor, app, Dispatcher.for_app(app))

    def _count(self, name: str, n: int) -> int:
        self.stats[name] = self.stats.get(name, 0) + n
        return n

    def promote(self) -> int:
        """Expire late jobs, then queue due ones for the dispatcher; return how many were queued."""
        with self.services.work.begin() as unit:
            expired = expire_due(unit, utcnow())
            promoted = promote_due(unit, utcnow())
        self._count("expired", expired)
        JOBS_REDRIVEN.labels("promoted").inc(promoted)
        if expired or promoted:
            logger.info("queued %d due jobs, expired %d late ones", promoted, expired)
        return self._count("promoted", promoted)

    def dispatch(self) -> int:
        """Make one dispatcher pass (its thread does this on its own); return how many it sent."""
        return self._count("dispatched", self.dispatcher.run_once().published)

    def fire_schedules(self) -> int:
        """Fire due schedule occurrences (none for tenants at their job quota); return how many."""
        settings = self.services.settings
        skipped: Counter[str] = Counter()
        with self.services.work.begin() as unit:
            jobs = fire_due_schedules(
                unit,
                self.services.registry,
                utcnow(),
                default_queue=settings.default_queue,
                misfire_grace=settings.misfire_grace_seconds,
                max_unfinished=settings.tenant_max_unfinished_jobs,
                skipped=skipped,
                gate=self.services.gate,
            )
        for reason, count in skipped.items():
            SCHEDULE_FIRES_SKIPPED.labels(reason).inc(count)
        if jobs:
            logger.info("fired %d schedule occurrences", len(jobs))
        return self._count("fired", len(jobs))

    def reap(self) -> int:
        """Retry or fail jobs whose worker vanished; terminate ignored cancellations."""
        settings = self.services.settings
        with self.services.work.begin() as unit:
            reaped = reap_stale(
                unit, self.services.registry, utcnow(), stale_after=settings.heartbeat_timeout
            )
        for job_id, job_type, outcome in reaped:
            JOBS_REDRIVEN.labels("reaped").inc()
            JOBS_FINISHED.labels(job_type, outcome).inc()
            logger.warning(
                "job %s lost its worker: now %s",
                job_id,
                outcome,
                extra={"job_id": str(job_id), "job_type": job_type},
            )
        with self.services.work.begin() as unit:
            overdue = stop_overdue(unit, utcnow(), grace=settings.cancel_grace_seconds)
        if overdue:
            # The ledger already says cancelled; this stops the process still running it.
            self.app.control.revoke([str(i) for i in overdue], terminate=True, signal="SIGKILL")
            logger.warning("terminated %d jobs that ignored a cancel request", len(overdue))
        return self._count("reaped", len(reaped))

    def reconcile(self) -> int:
        """Re-publish queued jobs whose message the broker no longer has; return how many.

        That covers messages the broker lost, and messages never sent: an API submit writes
        `published_at` with the job, so an API process that died between its commit and its
        publish (or could not clear the stamp after a failed publish) leaves a stamped job
        with no message, which only this pass finds.

        On Redis, a message a consumer took more than `reconcile_after` seconds ago for a job
        still queued counts as gone too: prefetch is one per process, so that consumer died
        between receiving and claiming. RabbitMQ cannot be looked into: see `_amqp_lost`.
        A second message is harmless; the claim guard runs one.
        """
        settings = self.services.settings
        with self.services.work.begin() as unit:
            stale = stale_queued(unit, utcnow(), older_than=settings.reconcile_after)
            if not stale:
                return 0
            lost = self._amqp_lost(stale) if settings.amqp_broker else self._redis_lost(stale)
            if lost is None:
                logger.info("broker backlog too deep to reconcile this pass")
                return 0
            redriven = redrive(unit, lost, utcnow())
        if redriven:
            JOBS_REDRIVEN.labels("reconciled").inc(redriven)
            logger.warning("re-drove %d queued jobs missing from the broker", redriven)
        return self._count("redriven", redriven)

    def _redis_lost(self, stale: list[RowMapping]) -> list[RowMapping] | None:
        """Return the stale jobs whose message is neither waiting nor freshly delivered."""
        settings = self.services.settings
        self._redis = self._redis or Redis.from_url(settings.broker, socket_timeout=5)
        present = broker_task_ids(
            self._redis,
            {j["queue"] for j in stale},
            settings.reconcile_scan_limit,
            delivered_since=time.time() - settings.reconcile_after,
        )
        if present is None:
            return None  # too deep to read this pass
        return [j for j in stale if str(j["id"]) not in present]

    def _amqp_lost(self, stale: list[RowMapping]) -> list[RowMapping]:
        """Return the stale jobs of queues RabbitMQ holds no waiting message for.

        AMQP cannot list a queue's messages, nor see deliveries a consumer holds. It does not
        need to: durable queues, persistent messages and publisher confirms keep what was
        published, and a consumer that dies hands its deliveries back at once (there is no
        visibility timeout to wait out). So a message goes missing only with the queue or
        the broker's disk. A queue that is empty (or gone) while jobs on it have been queued
        for `reconcile_after` seconds has lost their messages; a queue with messages waiting
        may still hold them behind a backlog, so its jobs wait for a pass when it has
        drained. At worst a job held unclaimed by a live consumer gets a second message,
        which the claim guard skips: nothing runs twice.
        """
        depths = broker_depths(self.app, sorted({j["queue"] for j in stale}))
        return [j for j in stale if depths[j["queue"]] == 0]

    def prune(self) -> dict[str, int]:
        """Delete one batch of each kind of row past its retention."""
        settings = self.services.settings
        with self.services.work.begin() as unit:
            return prune(
                unit,
                utcnow(),
                job_retention=timedelta(days=settings.job_retention_days),
                key_retention=timedelta(hours=settings.idempotency_retention_hours),
            )

    def run_once(self) -> tuple[int, int]:
        """Run every task and a dispatch pass once; return the jobs sent out and those reaped."""
        self.fire_schedules()
        self.promote()
        dispatched = self.dispatch()
        reaped = self.reap()
        self.reconcile()
        return dispatched, reaped

    def _tasks(self) -> list[tuple[Callable[[], Any], float]]:
        settings = self.services.settings
        return [
            (self.fire_schedules, settings.schedule_interval),
            (self.promote, settings.promote_interval),
            (self.reap, settings.reap_interval),
            (self.reconcile, settings.reconcile_interval),
            (self.prune, settings.prune_interval),
        ]

    def start(self) -> None:
        """Run each task on its interval on a daemon thread while this beat leads; dispatch too."""
        self.dispatcher.start()
        self._thread = threading.Thread(
            target=self._loop, name="conveyor-housekeeping", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop after its current task, wait for it, and give up the lead."""
        self._stop.set()
        self.dispatcher.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        leadership = Leadership(self.services)
        next_run = dict.fromkeys(range(len(self._tasks())), 0.0)
        try:
            while not self._stop.wait(TICK):
                if not leadership.hold():
                    continue
                for n, (task, interval) in enumerate(self._tasks()):
                    if self._stop.is_set() or time.monotonic() < next_run[n]:
                        continue
                    next_run[n] = time.monotonic() + interval
                    try:
                        task()
                    except Exception:  # an outage: log it; the task runs again next interval
                        logger.warning("housekeeping %s failed", task.__name__, exc_info=True)
        finally:
            leadership.release()
