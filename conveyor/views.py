"""The public view of a job: what the API returns and what webhooks deliver."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from conveyor.models import Job
from conveyor.states import JobState


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
