"""The public view of a job: what the API returns and what webhooks deliver."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from conveyor.models import Job
from conveyor.states import JobState


class JobError(BaseModel):
    """Why a job failed: the error's type and message, never a traceback."""

    type: str
    message: str


class JobOut(BaseModel):
    """A job as clients see it."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "0f6b1c1e-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
                "type": "system.sleep",
                "state": "running",
                "queue": "default",
                "priority": 5,
                "attempts": 1,
                "max_attempts": 3,
                "payload": {"seconds": 2},
                "result": None,
                "error": None,
                "progress": {"current": 10, "total": 20, "percent": 50.0, "eta_seconds": 1.0},
                "tags": ["demo"],
                "metadata": {"requested_by": "docs"},
                "schedule_id": None,
                "created_at": "2026-11-26T10:00:00Z",
                "scheduled_for": None,
                "started_at": "2026-11-26T10:00:01Z",
                "finished_at": None,
                "expires_at": None,
                "cancel_requested_at": None,
            }
        }
    )

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
