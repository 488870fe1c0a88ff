"""Admission control: a tenant's quota of unfinished jobs, and when a refused submit may retry."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from conveyor.errors import QuotaExceeded, ValidationFailed
from conveyor.ledger.requests import MAX_BATCH
from conveyor.ledger.states import UNFINISHED
from conveyor.models import Job

# Bounds of a quota refusal's Retry-After, in seconds, and the answer when nothing of the
# tenant finished within the drain window (its workers may be down or busy elsewhere).
RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 3600
RETRY_AFTER_IDLE = 60
# The drain rate looks at no more than this many recent finishes, so its cost stays bounded.
DRAIN_SAMPLE = 1000


@dataclass(frozen=True)
class DrainRate:
    """How many of a tenant's jobs finished over how many seconds."""

    finished: int
    seconds: float

    def retry_after(self, excess: int) -> int:
        """Return whole seconds until `excess` more jobs have drained, within sane bounds."""
        if self.finished <= 0 or self.seconds <= 0:
            return RETRY_AFTER_IDLE
        # Rounded before the ceiling, so 1 / (30 jobs / 300 s) is 10 s, not 11.
        wait = math.ceil(round(excess * self.seconds / self.finished, 6))
        return min(max(wait, RETRY_AFTER_MIN), RETRY_AFTER_MAX)


def count_unfinished(session: Session, tenant_id: uuid.UUID, cap: int) -> int:
    """Count the tenant's unfinished jobs, stopping at `cap` so the cost stays bounded."""
    # By state, so it reads ix_jobs_tenant_state_created: the finish-time index holds only
    # finished jobs (a job's finished_at is set exactly while its state is terminal).
    capped = (
        select(Job.id)
        .where(
            Job.tenant_id == tenant_id,
            Job.state.in_(sorted(UNFINISHED)),
            Job.finished_at.is_(None),
        )
        .limit(cap)
        .subquery()
    )
    return session.execute(select(func.count()).select_from(capped)).scalar_one()


def drain_rate(session: Session, tenant_id: uuid.UUID, now: datetime, window: float) -> DrainRate:
    """Measure the tenant's jobs finished over the last `window` seconds (or its last 1,000)."""
    recent = (
        select(Job.finished_at)
        .where(Job.tenant_id == tenant_id, Job.finished_at > now - timedelta(seconds=window))
        .order_by(Job.finished_at.desc())
        .limit(DRAIN_SAMPLE)
        .subquery()
    )
    finished, oldest = session.execute(select(func.count(), func.min(recent.c.finished_at))).one()
    if finished < DRAIN_SAMPLE:
        return DrainRate(finished, window)
    # A busy tenant: the sample spans less than the window; its own span gives the rate.
    return DrainRate(finished, max((now - oldest).total_seconds(), 0.001))


@dataclass
class _Tally:
    counted_at: float
    # Counted at `counted_at`, plus every job this process admitted since.
    unfinished: int


class TenantQuota:
    """Admit submissions while a tenant's unfinished jobs stay within `limit`.

    Counting a busy tenant's unfinished jobs costs in proportion to them, so each process
    counts a tenant at most once per `refresh` seconds and adds what it admits meanwhile.
    A refusal always rests on a count at most `refresh` seconds old; between counts, other
    API processes' submissions are unseen, so a tenant can overshoot by about `refresh`
    seconds of its submissions on the other processes. `refresh=0` counts every time.
    """

    def __init__(
        self,
        limit: int,
        *,
        refresh: float,
        drain_window: float,
        clock: Callable[[], float] = time.monotonic,
        max_tenants: int = 10_000,
    ) -> None:
        self.limit = limit
        self._refresh = refresh
        self._window = drain_window
        self._clock = clock
        self._max = max_tenants
        self._tallies: dict[uuid.UUID, _Tally] = {}
        self._lock = threading.Lock()

    def admit(self, session: Session, tenant_id: uuid.UUID, adding: int, now: datetime) -> None:
        """Count `adding` new jobs against the tenant's quota, or raise `QuotaExceeded`.

        `session` is read only when the tally is due for a count or a refusal needs its
        `Retry-After`; the submit's own transaction serves, so the check needs no connection
        of its own.
        """
        if self.limit <= 0 or adding <= 0:
            return
        if adding > self.limit:
            raise ValidationFailed(
                f"{adding} jobs can never fit the tenant's quota of {self.limit} unfinished jobs",
                errors=[{"field": "jobs", "message": f"at most {self.limit} jobs"}],
            )
        with self._lock:
            tally = self._tallies.get(tenant_id)
            if tally is not None and self._clock() - tally.counted_at >= self._refresh:
                tally = None
            if tally is not None and tally.unfinished + adding <= self.limit:
                tally.unfinished += adding
                return
        if tally is None:
            # Past the quota by at most a batch is enough to size the Retry-After.
            unfinished = count_unfinished(session, tenant_id, self.limit + MAX_BATCH)
            tally = _Tally(self._clock(), unfinished)
            with self._lock:
                if len(self._tallies) >= self._max:
                    self._tallies.clear()  # a flood of tenants: start over, stay bounded
                self._tallies[tenant_id] = tally
                if tally.unfinished + adding <= self.limit:
                    tally.unfinished += adding
                    return
        excess = tally.unfinished + adding - self.limit
        rate = drain_rate(session, tenant_id, now, self._window)
        raise QuotaExceeded(
            f"the tenant has {tally.unfinished} unfinished jobs and its quota is {self.limit}; "
            f"{excess} more must finish first",
            retry_after=rate.retry_after(excess),
        )
