"""The public view of a job: what the API returns and what webhooks deliver."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter

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


_DATETIME: TypeAdapter[datetime] = TypeAdapter(datetime)
_UTC_OFFSET = timedelta(0)


def _json_time(value: datetime | None) -> str | None:
    """Format a datetime exactly as pydantic's JSON mode does (UTC as `Z`)."""
    if value is None:
        return None
    if value.utcoffset() == _UTC_OFFSET:
        return value.replace(tzinfo=None).isoformat() + "Z"
    # Other offsets are rare (a client's `run_at`): pydantic itself says how they look.
    text: str = _DATETIME.dump_python(value, mode="json")
    return text


def new_job_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """Return a just-inserted job's client view, equal to `JobOut.of(...).model_dump(mode="json")`.

    The submit path's view, one dict serving the answer and the snapshot: building and
    dumping a pydantic model per job cost more than the insert of a batch. `row` holds the
    job's column values by attribute name, as `submit_jobs` writes them; its payload, tags
    and metadata are JSON values already (parsed from a request), so they pass as they are.
    """
    error_type = row.get("error_type")
    error = None
    if error_type and row["state"] != JobState.SUCCEEDED:
        error = {"type": error_type, "message": row.get("error_message") or ""}
    schedule_id = row.get("schedule_id")
    return {
        "id": str(row["id"]),
        "type": row["type"],
        "state": str(row["state"]),
        "queue": row["queue"],
        "priority": row["priority"],
        "attempts": row["attempt"],
        "max_attempts": row["max_attempts"],
        "payload": row["payload"],
        "result": row.get("result"),
        "error": error,
        "progress": None,
        "tags": row["tags"],
        "metadata": row["meta"],
        "schedule_id": None if schedule_id is None else str(schedule_id),
        "created_at": _json_time(row["created_at"]),
        "scheduled_for": _json_time(row.get("scheduled_for")),
        "started_at": _json_time(row.get("started_at")),
        "finished_at": _json_time(row.get("finished_at")),
        "expires_at": _json_time(row.get("expires_at")),
        "cancel_requested_at": _json_time(row.get("cancel_requested_at")),
    }


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
