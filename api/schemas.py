"""Request and response bodies of the jobs API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from conveyor.models import Job


class SubmitJob(BaseModel):
    """`POST /v1/jobs`: a job type and its payload."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)


class JobError(BaseModel):
    """Why a job failed: the error's type and message, never a traceback."""

    type: str
    message: str


class JobOut(BaseModel):
    """A job as clients see it."""

    id: uuid.UUID
    type: str
    queue: str
    state: str
    attempts: int
    max_attempts: int
    payload: dict[str, Any]
    result: dict[str, Any] | None
    error: JobError | None
    progress: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_job(cls, job: Job, progress: dict[str, Any] | None = None) -> JobOut:
        """Build the client view of a ledger row, with live progress if any."""
        error = (
            JobError(type=job.error_type, message=job.error_message or "")
            if job.error_type
            else None
        )
        return cls(
            id=job.id,
            type=job.type,
            queue=job.queue,
            state=job.state,
            attempts=job.attempt,
            max_attempts=job.max_attempts,
            payload=job.payload,
            result=job.result,
            error=error,
            progress=progress,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )
