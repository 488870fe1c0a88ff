"""Housekeeping that beat runs in a thread of its own: promote due jobs, reap lost ones.

It runs inside the beat process rather than as tasks on the job queues, so a worker
whose every process is busy with long jobs cannot starve it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy import select

from conveyor.broker import CeleryPublisher, Message
from conveyor.jobs import mark_published, promote_due_jobs, reap_stale_jobs
from conveyor.metrics import JOBS_FINISHED, JOBS_REDRIVEN
from conveyor.models import Job
from worker.runner import WorkerServices, utcnow

logger = logging.getLogger(__name__)


@dataclass
class Housekeeper:
    """Runs one housekeeping pass on demand, or passes in a loop on a daemon thread."""

    services: WorkerServices
    publisher: CeleryPublisher
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def for_app(cls, app: Celery) -> Housekeeper:
        """Build a housekeeper publishing through the worker app."""
        return cls(app.conveyor, CeleryPublisher(app))

    def run_once(self) -> tuple[int, int]:
        """Promote due jobs and reap lost ones; return how many of each."""
        settings = self.services.settings
        reasons: Counter[str] = Counter()
        with self.services.sessions.begin() as session:
            jobs = promote_due_jobs(
                session, utcnow(), republish_after=settings.republish_after, reasons=reasons
            )
            messages = [Message(j.id, j.type, j.queue) for j in jobs]
        if messages:
            # After the commit (see promote_due_jobs); a failed publish is retried next pass.
            self.publisher.publish(messages)
            with self.services.sessions.begin() as session:
                mark_published(session, [m.job_id for m in messages], utcnow())
            for reason, count in reasons.items():
                JOBS_REDRIVEN.labels(reason).inc(count)
            logger.info("promoted %d jobs", len(messages), extra=dict(reasons))
        with self.services.sessions.begin() as session:
            reaped = reap_stale_jobs(session, utcnow(), stale_after=settings.heartbeat_timeout)
            # Rare (a worker died): one more small query to count them by type is fine.
            types: dict[uuid.UUID, str] = {}
            if reaped:
                ids = [job_id for job_id, _ in reaped]
                types.update(session.execute(select(Job.id, Job.type).where(Job.id.in_(ids))).all())
        for job_id, outcome in reaped:
            JOBS_REDRIVEN.labels("reaped").inc()
            JOBS_FINISHED.labels(types.get(job_id, "unknown"), outcome).inc()
            logger.warning(
                "job %s lost its worker: now %s",
                job_id,
                outcome,
                extra={"job_id": str(job_id), "job_type": types.get(job_id)},
            )
        return len(messages), len(reaped)

    def start(self) -> None:
        """Run passes every `housekeeping_interval` seconds on a daemon thread."""
        threading.Thread(target=self._loop, name="conveyor-housekeeping", daemon=True).start()

    def stop(self) -> None:
        """Ask the loop to end after its current pass."""
        self._stop.set()

    def _loop(self) -> None:
        interval = self.services.settings.housekeeping_interval
        while not self._stop.wait(interval):
            try:
                self.run_once()
            except Exception:  # a database or broker outage: log it and try again next pass
                logger.warning("housekeeping pass failed", exc_info=True)
