"""What a tenant's jobs did lately: finishes per minute and the latest failures (the console).

Both read `ix_jobs_tenant_finished` (tenant_id, finished_at; finished jobs only): the cost
is the last hour's finished jobs, never the whole table.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.orm import Session

from conveyor.ledger.states import JobState
from conveyor.models import Job

# How far back the overview's recent failures go.
FAILURES_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Minute:
    """The jobs that finished in one minute: succeeded and failed."""

    at: datetime
    succeeded: int
    failed: int


def finishes_per_minute(
    session: Session, tenant_id: uuid.UUID, now: datetime, minutes: int = 60
) -> list[Minute]:
    """Return one `Minute` per minute of the last `minutes`, oldest first, zeros included."""
    end = now.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    minute = func.date_trunc("minute", Job.finished_at)
    rows = session.execute(
        select(
            minute,
            func.count().filter(Job.state == JobState.SUCCEEDED),
            func.count().filter(Job.state == JobState.FAILED),
        )
        .where(Job.tenant_id == tenant_id, Job.finished_at >= start, Job.finished_at < end)
        .group_by(minute)
    ).all()
    counted = {at.astimezone(UTC): (ok, failed) for at, ok, failed in rows}
    series = []
    for step in range(minutes):
        at = start + timedelta(minutes=step)
        ok, failed = counted.get(at, (0, 0))
        series.append(Minute(at, ok, failed))
    return series


def recent_failures(
    session: Session, tenant_id: uuid.UUID, now: datetime, limit: int = 10
) -> Sequence[RowMapping]:
    """Return the tenant's latest failed jobs of the last `FAILURES_WINDOW`, newest first.

    The window bounds the walk: a tenant with no failure costs a day of finishes, never
    its whole history.
    """
    return (
        session.execute(
            select(Job.id, Job.type, Job.queue, Job.error_type, Job.error_message, Job.finished_at)
            .where(Job.tenant_id == tenant_id, Job.finished_at >= now - FAILURES_WINDOW)
            .where(Job.state == JobState.FAILED)
            .order_by(Job.finished_at.desc())
            .limit(limit)
        )
        .mappings()
        .all()
    )
