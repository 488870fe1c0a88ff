"""Response bodies and query models of the jobs API (requests: `conveyor.submit.JobRequest`)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from conveyor.models import Job, JobEvent
from conveyor.queries import MAX_PAGE, JobFilter
from conveyor.states import JobState
from conveyor.submit import MAX_BATCH, JobRequest


class JobBatch(BaseModel):
    """`POST /v1/jobs/batch`: up to 1,000 jobs, accepted all together or not at all."""

    model_config = ConfigDict(extra="forbid")
    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BATCH)


class JobQuery(BaseModel):
    """The filters shared by `GET /v1/jobs` and `POST /v1/jobs/retry`."""

    model_config = ConfigDict(extra="forbid")
    state: JobState | None = None
    type: str | None = Field(default=None, max_length=200)
    queue: str | None = Field(default=None, max_length=100)
    tag: str | None = Field(default=None, max_length=64)
    created_after: AwareDatetime | None = None
    created_before: AwareDatetime | None = None

    def filters(self) -> JobFilter:
        """Return the filter the repository layer applies."""
        return JobFilter(
            state=self.state,
            type=self.type,
            queue=self.queue,
            tag=self.tag,
            created_after=self.created_after,
            created_before=self.created_before,
        )


class JobListQuery(JobQuery):
    """`GET /v1/jobs` query parameters."""

    limit: int = Field(default=50, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, max_length=200)


class BulkRetry(JobQuery):
    """`POST /v1/jobs/retry`: which dead jobs to run again (failed ones by default)."""

    limit: int = Field(default=100, ge=1, le=1000)


class JobError(BaseModel):
    """Why a job failed: the error's type and message, never a traceback."""

    type: str
    message: str


class JobOut(BaseModel):
    """A job as clients see it."""

    id: uuid.UUID
    type: str
    state: str
    queue: str
    priority: int
    attempts: int
    max_attempts: int
    payload: dict[str, Any]
    result: dict[str, Any] | None
    error: JobError | None
    progress: dict[str, Any] | None
    tags: list[str]
    metadata: dict[str, Any]
    schedule_id: uuid.UUID | None
    created_at: datetime
    scheduled_for: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    cancel_requested_at: datetime | None

    @classmethod
    def of(cls, job: Job, progress: dict[str, Any] | None = None) -> JobOut:
        """Build the client view of a ledger row, with live progress if any."""
        error = None
        if job.error_type and job.state != JobState.SUCCEEDED:
            error = JobError(type=job.error_type, message=job.error_message or "")
        return cls(
            id=job.id,
            type=job.type,
            state=job.state,
            queue=job.queue,
            priority=job.priority,
            attempts=job.attempt,
            max_attempts=job.max_attempts,
            payload=job.payload,
            result=job.result,
            error=error,
            progress=with_eta(progress, job.started_at),
            tags=job.tags,
            metadata=job.meta,
            schedule_id=job.schedule_id,
            created_at=job.created_at,
            scheduled_for=job.scheduled_for,
            started_at=job.started_at,
            finished_at=job.finished_at,
            expires_at=job.expires_at,
            cancel_requested_at=job.cancel_requested_at,
        )


def with_eta(progress: dict[str, Any] | None, started: datetime | None) -> dict[str, Any] | None:
    """Add `eta_seconds`, extrapolated from the time taken so far, to a progress report."""
    if progress is None or started is None:
        return progress
    current, total = progress.get("current"), progress.get("total")
    eta = None
    if isinstance(current, int | float) and isinstance(total, int | float) and current > 0:
        elapsed = (datetime.now(UTC) - started).total_seconds()
        eta = round(max(0.0, elapsed * (total - current) / current), 1)
    return {**progress, "eta_seconds": eta}


class EventOut(BaseModel):
    """One transition in a job's history."""

    from_state: str | None
    to_state: str
    attempt: int
    detail: dict[str, Any] | None
    at: datetime

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        """Build from a row."""
        return cls(
            from_state=event.from_state,
            to_state=event.to_state,
            attempt=event.attempt,
            detail=event.detail,
            at=event.created_at,
        )
