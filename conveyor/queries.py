"""Reading the ledger, always within one tenant: a job, a filtered page of jobs, a history."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.orm import Session

from conveyor.errors import NotFound, ValidationFailed
from conveyor.models import Job, JobEvent

MAX_PAGE = 200


@dataclass(frozen=True)
class JobFilter:
    """What `GET /v1/jobs` and bulk retry may filter on."""

    state: str | None = None
    type: str | None = None
    queue: str | None = None
    tag: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def apply(self, query: Select[Job]) -> Select[Job]:
        """Narrow `query` by every filter that is set."""
        if self.state is not None:
            query = query.where(Job.state == self.state)
        if self.type is not None:
            query = query.where(Job.type == self.type)
        if self.queue is not None:
            query = query.where(Job.queue == self.queue)
        if self.tag is not None:
            query = query.where(Job.tags.contains([self.tag]))
        if self.created_after is not None:
            query = query.where(Job.created_at > self.created_after)
        if self.created_before is not None:
            query = query.where(Job.created_at < self.created_before)
        return query


def get_job(session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID) -> Job:
    """Return the tenant's job, or raise `NotFound` (also for another tenant's job)."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"there is no job {job_id}")
    return job


def get_job_versioned(session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID) -> tuple[Job, int]:
    """Return the tenant's job and the id of its latest event, both read in one statement."""
    latest = select(func.max(JobEvent.id)).where(JobEvent.job_id == Job.id).scalar_subquery()
    row = session.execute(
        select(Job, latest).where(Job.id == job_id, Job.tenant_id == tenant_id)
    ).one_or_none()
    if row is None:
        raise NotFound(f"there is no job {job_id}")
    return row[0], row[1] or 0


def encode_cursor(job: Job) -> str:
    """Return an opaque cursor that continues after `job`."""
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Parse a cursor from `encode_cursor`, or raise `ValidationFailed`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, job_id = raw.partition("|")
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except ValueError as exc:
        raise ValidationFailed(
            "the cursor is not one this API gave out",
            errors=[{"field": "cursor", "message": "malformed"}],
        ) from exc


def list_jobs(
    session: Session,
    tenant_id: uuid.UUID,
    filters: JobFilter,
    *,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[Sequence[Job], str | None]:
    """Return a page of the tenant's jobs, newest first, and the cursor of the next page.

    Keyset pagination on (created_at, id): jobs inserted meanwhile are newer than any
    page already read, so pages never repeat or skip a job.
    """
    query = filters.apply(select(Job).where(Job.tenant_id == tenant_id))
    if cursor is not None:
        created, job_id = decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created, job_id))
    page_size = max(1, min(limit, MAX_PAGE))
    jobs = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(page_size + 1)
    ).all()
    if len(jobs) > page_size:
        return jobs[:page_size], encode_cursor(jobs[page_size - 1])
    return jobs, None


def list_events(session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID) -> Sequence[JobEvent]:
    """Return a job's history, oldest first (`NotFound` for another tenant's job)."""
    get_job(session, job_id, tenant_id)
    return session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    ).all()
