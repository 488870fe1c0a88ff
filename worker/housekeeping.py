"""Housekeeping that beat runs in a thread of its own: promote due jobs, reap lost ones.

It runs inside the beat process rather than as tasks on the job queues, so a worker
whose every process is busy with long jobs cannot starve it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from celery import Celery

from conveyor.broker import CeleryPublisher, Message
from conveyor.jobs import (
    expire_jobs,
    mark_published,
    overdue_cancellations,
    promote_due_jobs,
    reap_stale_jobs,
)
from conveyor.retention import prune
from worker.runner import WorkerServices, utcnow

logger = logging.getLogger(__name__)


# Pruning deletes rows in bulk; once a minute is plenty.
PRUNE_INTERVAL = 60.0


@dataclass
class Housekeeper:
    """Runs one housekeeping pass on demand, or passes in a loop on a daemon thread."""

    services: WorkerServices
    publisher: CeleryPublisher
    app: Celery
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def for_app(cls, app: Celery) -> Housekeeper:
        """Build a housekeeper publishing through the worker app."""
        return cls(app.conveyor, CeleryPublisher(app), app)

    def run_once(self) -> tuple[int, int]:
        """Expire, promote, reap and terminate; return how many were promoted and reaped."""
        settings = self.services.settings
        with self.services.sessions.begin() as session:
            expired = expire_jobs(session, utcnow())
            jobs = promote_due_jobs(session, utcnow(), republish_after=settings.republish_after)
            messages = [Message.of(j) for j in jobs]
        if expired:
            logger.info("expired %d jobs that did not start in time", expired)
        if messages:
            # After the commit (see promote_due_jobs); a failed publish is retried next pass.
            self.publisher.publish(messages)
            with self.services.sessions.begin() as session:
                mark_published(session, [m.job_id for m in messages], utcnow())
            logger.info("promoted %d jobs", len(messages))
        with self.services.sessions.begin() as session:
            reaped = reap_stale_jobs(session, utcnow(), stale_after=settings.heartbeat_timeout)
        for job_id, outcome in reaped:
            logger.warning("job %s lost its worker: now %s", job_id, outcome)
        self._terminate_overdue_cancellations()
        return len(messages), len(reaped)

    def _terminate_overdue_cancellations(self) -> None:
        grace = self.services.settings.cancel_grace_seconds
        with self.services.sessions.begin() as session:
            overdue = overdue_cancellations(session, utcnow(), grace=grace)
        if overdue:
            # The ledger already says cancelled; this stops the process still running it.
            self.app.control.revoke([str(i) for i in overdue], terminate=True, signal="SIGKILL")
            logger.warning("terminated %d jobs that ignored a cancel request", len(overdue))

    def prune(self) -> dict[str, int]:
        """Delete one batch of each kind of row past its retention."""
        settings = self.services.settings
        with self.services.sessions.begin() as session:
            return prune(
                session,
                utcnow(),
                job_retention=timedelta(days=settings.job_retention_days),
                key_retention=timedelta(hours=settings.idempotency_retention_hours),
            )

    def start(self) -> None:
        """Run passes every `housekeeping_interval` seconds on a daemon thread."""
        self._thread = threading.Thread(
            target=self._loop, name="conveyor-housekeeping", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop after its current pass, and wait for that pass to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        interval = self.services.settings.housekeeping_interval
        last_prune = 0.0
        while not self._stop.wait(interval):
            try:
                self.run_once()
                if time.monotonic() - last_prune >= PRUNE_INTERVAL:
                    last_prune = time.monotonic()
                    logger.info("pruned %s", self.prune())
            except Exception:  # a database or broker outage: log it and try again next pass
                logger.warning("housekeeping pass failed", exc_info=True)
