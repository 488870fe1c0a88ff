"""Response bodies and query models of the jobs API (requests: `conveyor.submit.JobRequest`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from conveyor.models import JobEvent
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
