"""Reading the ledger, always within one tenant: a job, its view, a page of jobs, a history."""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import Select, func, literal_column, select, tuple_
from sqlalchemy.engine import RowMapping
from sqlalchemy.orm import Session

from conveyor.errors import ValidationFailed
from conveyor.ledger.statements import ROW
from conveyor.ledger.states import JobState
from conveyor.ledger.views import JobRow, job_view, with_eta
from conveyor.live.store import LiveStore, LiveView, Prefetched
from conveyor.models import Job, JobEvent
from conveyor.tenancy import owned_row

logger = logging.getLogger(__name__)
MAX_PAGE = 200
HAS_TAGS = Job.tags.op("<>")(literal_column("'{}'"))


@dataclass(frozen=True)
class JobFilter:
    """What `GET /v1/jobs` and bulk retry may filter on."""

    state: JobState | None = None
    type: str | None = None
    queue: str | None = None
    tag: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        """Narrow `query` (which selects from `jobs`) by every filter that is set."""
        if self.state is not None:
            query = query.where(Job.state == self.state)
        if self.type is not None:
            query = query.where(Job.type == self.type)
        if self.queue is not None:
            query = query.where(Job.queue == self.queue)
        if self.tag is not None:
            # The index predicate spelled out, as a literal: only then may the planner use
            # the partial ix_jobs_tags (a job holding the tag has a non-empty array).
            query = query.where(Job.tags.contains([self.tag]), HAS_TAGS)
        if self.created_after is not None:
            query = query.where(Job.created_at > self.created_after)
        if self.created_before is not None:
            query = query.where(Job.created_at < self.created_before)
        return query


def job_row(session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID) -> RowMapping:
    """Return the tenant's job as a row of columns; `NotFound` (also for another tenant's)."""
    return owned_row(session, Job, ROW, job_id, tenant_id, "job")


def read_view(
    live: LiveStore,
    session: Session,
    job_id: uuid.UUID,
    tenant_id: uuid.UUID,
    prefetched: Prefetched | None = None,
) -> dict[str, Any]:
    """Return the tenant's job as clients see it: from its live view, else from the ledger.

    A ledger read stores what it read as the live view (at the row's version, so a newer
    view written meanwhile wins). `NotFound` for another tenant's job. `prefetched`, the
    view already read, is checked as `LiveStore.read` checks one. `session` is used only
    when the live view is missing: an autocommit session costs nothing until then.
    """
    found = live.read(job_id, tenant_id, prefetched)
    if found is not None:
        view = found.view
        if view["state"] == JobState.RUNNING and found.progress is not None:
            started = view.get("started_at")
            view["progress"] = with_started(found.progress, started)
        return view
    row = job_row(session, job_id, tenant_id)
    view = job_view(row)
    live.write([LiveView.of(row["id"], row["version"], row["tenant_id"], view)])
    if row["state"] == JobState.RUNNING:
        try:
            progress = live.progress(job_id)
        except RedisError:
            logger.warning("progress of job %s unavailable", job_id, exc_info=True)
            progress = None
        return job_view(row, progress)
    return view


def with_started(progress: dict[str, Any], started: str | None) -> dict[str, Any] | None:
    """Add the ETA to a progress report, given the job's start time as its view shows it."""
    return with_eta(progress, datetime.fromisoformat(started) if started else None)


def encode_cursor(row: JobRow) -> str:
    """Return an opaque cursor that continues after the job `row`."""
    raw = f"{row['created_at'].isoformat()}|{row['id']}"
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
) -> tuple[Sequence[RowMapping], str | None]:
    """Return a page of the tenant's jobs, newest first, and the cursor of the next page.

    Keyset pagination on (created_at, id): jobs inserted meanwhile are newer than any
    page already read, so pages never repeat or skip a job.
    """
    query = filters.apply(select(*ROW).where(Job.tenant_id == tenant_id))
    if cursor is not None:
        created, job_id = decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created, job_id))
    page_size = max(1, min(limit, MAX_PAGE))
    rows = (
        session.execute(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(page_size + 1))
        .mappings()
        .all()
    )
    if len(rows) > page_size:
        return rows[:page_size], encode_cursor(rows[page_size - 1])
    return rows, None


def list_events(session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID) -> Sequence[JobEvent]:
    """Return a job's history, oldest first (`NotFound` for another tenant's job)."""
    job_row(session, job_id, tenant_id)
    return session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    ).all()


def latest_event_id(session: Session, job_id: uuid.UUID) -> int | None:
    """Return the id of a job's latest event (the `id:` a stream of it starts from)."""
    found: int | None = session.scalar(
        select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(1)
    )
    return found


def newest_event_id(session: Session) -> int:
    """Return the id of the newest event of any job (a new tenant stream starts after it)."""
    found: int | None = session.scalar(select(func.max(JobEvent.id)))
    return found or 0


def job_events_after(
    session: Session, job_id: uuid.UUID, after: int, *, limit: int = 1000
) -> Sequence[JobEvent]:
    """Return a job's events after the event `after`, oldest first (the caller owns the job).

    A job's events are written under its row lock, so their ids grow in commit order: reading
    by id after the last one sent misses none and repeats none.
    """
    return session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after)
        .order_by(JobEvent.id)
        .limit(limit)
    ).all()


def tenant_events_after(
    session: Session,
    tenant_id: uuid.UUID,
    after: int,
    filters: JobFilter,
    *,
    limit: int = 500,
) -> Sequence[RowMapping]:
    """Return the tenant's transitions after the event `after`, oldest first, with their jobs.

    Each row is the job's columns plus `event_id` and `to_state`; `filters.state` matches the
    transition's target state, the other filters the job.
    """
    query = select(*ROW, JobEvent.id.label("event_id"), JobEvent.to_state.label("to_state"))
    query = query.join_from(JobEvent, Job, Job.id == JobEvent.job_id)
    query = query.where(Job.tenant_id == tenant_id, JobEvent.id > after)
    if filters.state is not None:
        query = query.where(JobEvent.to_state == filters.state)
    query = JobFilter(type=filters.type, queue=filters.queue, tag=filters.tag).apply(query)
    return session.execute(query.order_by(JobEvent.id).limit(limit)).mappings().all()
