"""The job lifecycle: submit, claim, finish and promote, each one guarded UPDATE.

Functions here flush and never commit: the caller (a request handler, the task
runner, the promoter) owns the transaction. Every transition writes one
`job_events` row beside the guarded `UPDATE ... WHERE state IN (...)`.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from conveyor.errors import NotFound
from conveyor.models import Job, JobEvent
from conveyor.registry import JobRegistry
from conveyor.states import JobState, sources_of

ERROR_MESSAGE_LIMIT = 2000


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now owns for one attempt."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    type: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    # When the job fell due (created, or its delay or backoff over): the start of its wait.
    due_at: datetime | None = None


def _record(
    session: Session,
    job_id: uuid.UUID,
    source: JobState | None,
    target: JobState,
    attempt: int,
    detail: dict[str, Any] | None = None,
) -> None:
    session.execute(
        insert(JobEvent).values(
            job_id=job_id,
            from_state=source,
            to_state=target,
            attempt=attempt,
            detail=detail,
        )
    )


def submit_job(
    session: Session,
    registry: JobRegistry,
    *,
    tenant_id: uuid.UUID,
    type_name: str,
    payload: dict[str, Any],
    default_queue: str,
) -> Job:
    """Validate and insert a queued job and its first event; the caller publishes after commit."""
    job_type = registry.get(type_name)
    parsed = job_type.parse_payload(payload)
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        type=job_type.name,
        queue=job_type.queue or default_queue,
        state=JobState.QUEUED,
        payload=parsed.model_dump(mode="json"),
        attempt=0,
        max_attempts=job_type.max_attempts,
    )
    session.add(job)
    session.flush()
    _record(session, job.id, None, JobState.QUEUED, 0)
    return job


def mark_published(session: Session, job_ids: Sequence[uuid.UUID], now: datetime) -> None:
    """Record that the broker accepted these jobs' messages, so the promoter leaves them be."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.published_at.is_(None))
        .values(published_at=now)
        .execution_options(synchronize_session=False)
    )


def get_job(session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID) -> Job:
    """Return the tenant's job, or raise `NotFound` (also for another tenant's job)."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"there is no job {job_id}")
    return job


def claim_job(session: Session, job_id: uuid.UUID, worker: str, now: datetime) -> ClaimedJob | None:
    """Take a queued job for one attempt; `None` means a duplicate or a job no longer queued."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(sources_of(JobState.RUNNING)))
        .values(
            state=JobState.RUNNING,
            attempt=Job.attempt + 1,
            started_at=now,
            heartbeat_at=now,
            worker=worker,
        )
        .returning(
            Job.id,
            Job.tenant_id,
            Job.type,
            Job.payload,
            Job.attempt,
            Job.max_attempts,
            func.coalesce(Job.scheduled_for, Job.created_at),
        )
    ).one_or_none()
    if row is None:
        return None
    claimed = ClaimedJob(*row)
    _record(session, job_id, JobState.QUEUED, JobState.RUNNING, claimed.attempt, {"worker": worker})
    return claimed


def _finish(
    session: Session,
    job: ClaimedJob,
    target: JobState,
    detail: dict[str, Any] | None = None,
    **values: Any,
) -> bool:
    """Move a running attempt to `target`; `False` if the attempt no longer owns the job."""
    owned = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == JobState.RUNNING, Job.attempt == job.attempt)
        .values(state=target, **values)
        .returning(Job.id)
    ).one_or_none()
    if owned is None:
        return False
    _record(session, job.id, JobState.RUNNING, target, job.attempt, detail)
    return True


def succeed_job(
    session: Session, job: ClaimedJob, result: dict[str, Any] | None, now: datetime
) -> bool:
    """Finish an attempt as `succeeded` with its result."""
    return _finish(session, job, JobState.SUCCEEDED, result=result, finished_at=now)


def retry_delay(attempt: int, base: float = 2.0, cap: float = 300.0) -> timedelta:
    """Return an exponential backoff with full jitter for the attempt just failed."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return timedelta(seconds=random.uniform(0, ceiling))  # noqa: S311 - jitter, not crypto


def fail_job(
    session: Session,
    job: ClaimedJob,
    error: BaseException,
    now: datetime,
    *,
    retryable: bool = True,
) -> JobState | None:
    """Finish a failed attempt: `retrying` with a backoff while attempts remain, else `failed`."""
    error_type = type(error).__name__
    message = str(error)[:ERROR_MESSAGE_LIMIT] or error_type
    detail = {"error_type": error_type, "error_message": message}
    values: dict[str, Any] = {"error_type": error_type, "error_message": message}
    if retryable and job.attempt < job.max_attempts:
        target = JobState.RETRYING
        values["scheduled_for"] = now + retry_delay(job.attempt)
        values["published_at"] = None
    else:
        target = JobState.FAILED
        values["finished_at"] = now
    if not _finish(session, job, target, detail, **values):
        return None
    return target


def promote_due_jobs(
    session: Session,
    now: datetime,
    *,
    batch_size: int = 500,
    unpublished_after: float = 10.0,
    republish_after: float = 900.0,
    reasons: Counter[str] | None = None,
) -> list[Job]:
    """Queue due jobs and take back queued jobs whose message may be lost, for publishing.

    Three kinds: scheduled/retrying jobs now due; queued jobs whose publish was never
    confirmed (broker down at submit); and queued jobs published long ago and still not
    claimed (the broker lost the message, or a delivery was acknowledged unrun). Each
    comes back queued with `published_at` cleared: the caller commits, then publishes,
    then marks them published. Publishing after the commit matters: a worker's claim only
    sees committed rows, so an id published earlier would be skipped and lost.
    Rows are locked with `FOR UPDATE SKIP LOCKED` so promoters never block each other.
    `reasons`, when given, counts them as `promoted` (fell due) or `republished`.
    """
    waiting = (JobState.SCHEDULED, JobState.RETRYING)
    queued_since = func.coalesce(Job.scheduled_for, Job.created_at)
    jobs = list(
        session.scalars(
            select(Job)
            .where(
                (Job.state.in_(waiting) & (Job.scheduled_for <= now))
                | (
                    (Job.state == JobState.QUEUED)
                    & Job.published_at.is_(None)
                    & (queued_since <= now - timedelta(seconds=unpublished_after))
                )
                | (
                    (Job.state == JobState.QUEUED)
                    & (Job.published_at <= now - timedelta(seconds=republish_after))
                )
            )
            .order_by(queued_since, Job.id)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        )
    )
    for job in jobs:
        if reasons is not None:
            reasons["republished" if job.state == JobState.QUEUED else "promoted"] += 1
        if job.state != JobState.QUEUED:
            _record(session, job.id, JobState(job.state), JobState.QUEUED, job.attempt)
        job.state = JobState.QUEUED
        job.published_at = None
    session.flush()
    return jobs


def beat_heartbeats(session: Session, job_ids: Sequence[uuid.UUID], now: datetime) -> None:
    """Record that these running jobs' worker is alive."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.state == JobState.RUNNING)
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )


class WorkerLost(Exception):
    """Stands for a worker that stopped mid-job: killed, out of memory, or past its limit."""


def reap_stale_jobs(
    session: Session, now: datetime, *, stale_after: float, batch_size: int = 100
) -> list[tuple[uuid.UUID, JobState]]:
    """Fail or retry running jobs whose worker stopped sending heartbeats."""
    rows = session.execute(
        select(Job.id, Job.tenant_id, Job.type, Job.payload, Job.attempt, Job.max_attempts)
        .where(
            Job.state == JobState.RUNNING,
            Job.heartbeat_at < now - timedelta(seconds=stale_after),
        )
        .order_by(Job.heartbeat_at)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    ).all()
    lost = WorkerLost(f"the worker sent no heartbeat for {stale_after:.0f}s")
    reaped = []
    for row in rows:
        outcome = fail_job(session, ClaimedJob(*row), lost, now)
        if outcome is not None:
            reaped.append((row.id, outcome))
    return reaped
