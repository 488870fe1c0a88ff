"""What people do to jobs after submitting them: cancel, and retry one or many."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from conveyor.errors import Conflict
from conveyor.jobs import record_event
from conveyor.models import Job, JobEvent
from conveyor.queries import JobFilter, get_job
from conveyor.registry import JobRegistry
from conveyor.snapshots import Snapshot, note
from conveyor.states import NOT_STARTED, RETRYABLE_BY_HAND, JobState

CancelOutcome = Literal["cancelled", "cancel_requested"]
MAX_BULK_RETRY = 1000


def cancel_job(
    session: Session,
    registry: JobRegistry,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    now: datetime,
    by: dict[str, Any],
) -> tuple[Job, CancelOutcome]:
    """Cancel a job that has not started at once; ask a running one to stop.

    A message for a cancelled job that arrives later finds nothing to claim.
    """
    job = get_job(session, job_id, tenant_id)
    state = JobState(job.state)
    if state in NOT_STARTED:
        session.execute(
            update(Job).where(Job.id == job.id).values(state=JobState.CANCELLED, finished_at=now)
        )
        record_event(session, job.id, state, JobState.CANCELLED, job.attempt, by)
        session.refresh(job)
        return job, "cancelled"
    if state == JobState.RUNNING:
        if not registry.get(job.type).cancellable:
            raise Conflict(f"a running {job.type} job cannot be cancelled")
        job.cancel_requested_at = job.cancel_requested_at or now
        session.flush()
        # A change without an event: version it just above the latest event, so the
        # running snapshot (written at that event) cannot come back over it.
        latest = session.scalar(select(func.max(JobEvent.id)).where(JobEvent.job_id == job.id))
        note(session, [Snapshot.of(job, (latest or 0) + 0.5)])
        return job, "cancel_requested"
    raise Conflict(f"a {state} job cannot be cancelled")


def _requeue(session: Session, job: Job, registry: JobRegistry, by: dict[str, Any]) -> None:
    """Send a finished job back to the queue with a fresh attempt budget, history kept."""
    source = JobState(job.state)
    budget = registry.get(job.type).retry.max_attempts
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(
            state=JobState.QUEUED,
            max_attempts=job.attempt + budget,
            published_at=None,
            finished_at=None,
            scheduled_for=None,
            expires_at=None,
            cancel_requested_at=None,
        )
    )
    record_event(session, job.id, source, JobState.QUEUED, job.attempt, {"retry": by})


def retry_job(
    session: Session,
    registry: JobRegistry,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    by: dict[str, Any],
) -> Job:
    """Re-run a failed, cancelled or expired job; the caller publishes it after commit."""
    job = get_job(session, job_id, tenant_id)
    if JobState(job.state) not in RETRYABLE_BY_HAND:
        raise Conflict(f"a {job.state} job cannot be retried")
    _requeue(session, job, registry, by)
    session.refresh(job)
    return job


def retry_jobs(
    session: Session,
    registry: JobRegistry,
    tenant_id: uuid.UUID,
    filters: JobFilter,
    by: dict[str, Any],
    *,
    limit: int = MAX_BULK_RETRY,
) -> list[Job]:
    """Re-run up to `limit` of the tenant's dead jobs that match `filters` (default: failed)."""
    state = filters.state or JobState.FAILED
    if JobState(state) not in RETRYABLE_BY_HAND:
        raise Conflict(f"{state} jobs cannot be retried")
    query = filters.apply(select(Job).where(Job.tenant_id == tenant_id, Job.state == state))
    jobs = list(
        session.scalars(
            query.order_by(Job.created_at).limit(min(limit, MAX_BULK_RETRY)).with_for_update()
        )
    )
    for job in jobs:
        _requeue(session, job, registry, by)
    for job in jobs:
        session.refresh(job)
    return jobs
