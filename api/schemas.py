"""Request, query, path and response models of the jobs API (one job: `JobRequest`)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.openapi import ObjectId, QueryModel
from conveyor.ledger.reads import MAX_PAGE, JobFilter
from conveyor.ledger.requests import MAX_BATCH, JobRequest
from conveyor.ledger.states import JobState
from conveyor.ledger.views import JobOut
from conveyor.models import JobEvent


class JobBatch(BaseModel):
    """`POST /v1/jobs/batch`: up to 1,000 jobs, accepted all together or not at all."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "jobs": [
                    {"type": "system.sleep", "payload": {"seconds": 1}},
                    {"type": "system.noop", "priority": 9, "tags": ["nightly"]},
                ]
            }
        },
    )
    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BATCH)


class JobPath(BaseModel):
    """A job's id in the path."""

    job_id: ObjectId


class JobWait(QueryModel):
    """`GET /v1/jobs/{id}`: `?wait=N` holds the request up to N seconds for a change."""

    # Not "forbid": the poll ignored unknown parameters before, and clients send some.
    wait: float | None = Field(
        default=None,
        ge=0,
        le=60,
        description="With `If-None-Match`: seconds to wait for the job to change (else 304).",
    )


class JobQuery(QueryModel):
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

    model_config = ConfigDict(
        json_schema_extra={"example": {"type": "orders.import_csv", "limit": 100}}
    )
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


class EventList(BaseModel):
    """`GET /v1/jobs/{id}/events`: the job's transitions, oldest first."""

    items: list[EventOut]


class JobList(BaseModel):
    """Jobs accepted together (`POST /v1/jobs/batch`)."""

    items: list[JobOut]


class PageLinks(BaseModel):
    """Links to related pages; `next` is absent on the last page."""

    next: str | None = None


class JobPage(BaseModel):
    """`GET /v1/jobs`: one page of jobs, newest first."""

    items: list[JobOut]
    next_cursor: str | None
    links: PageLinks


class CancelAnswer(BaseModel):
    """`POST /v1/jobs/{id}/cancel`: whether the job stopped at once or was asked to stop."""

    outcome: Literal["cancelled", "cancel_requested"]
    job: JobOut


class Retried(BaseModel):
    """`POST /v1/jobs/retry`: how many dead jobs run again, and which."""

    retried: int
    ids: list[uuid.UUID]


class JobTypeOut(BaseModel):
    """A job type that can be submitted, with its options and schemas."""

    name: str
    queues: list[str]
    priority: int
    max_attempts: int
    soft_time_limit: float | None
    time_limit: float
    cancellable: bool
    payload_schema: dict[str, Any]
    result_schema: dict[str, Any] | None


class JobTypeList(BaseModel):
    """`GET /v1/job-types`."""

    items: list[JobTypeOut]
