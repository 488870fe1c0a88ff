"""The public view of a job: what the API returns, the live views hold and webhooks deliver."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from conveyor.ledger.states import JobState, Waiting
from conveyor.telemetry.tracing import trace_id_of

# A job's columns by name, as a statement returned them (a RowMapping) or as a submit
# built them (a dict).
JobRow = Mapping[Any, Any]


class JobError(BaseModel):
    """Why a job failed: the error's type and message, never a traceback."""

    type: str
    message: str


class JobOut(BaseModel):
    """A job as clients see it (the schema of `job_view`'s dictionaries)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "0f6b1c1e-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
                "type": "system.sleep",
                "state": "running",
                "waiting_for": None,
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
                "workflow_id": None,
                "created_at": "2026-11-26T10:00:00Z",
                "scheduled_for": None,
                "started_at": "2026-11-26T10:00:01Z",
                "finished_at": None,
                "expires_at": None,
                "cancel_requested_at": None,
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            }
        }
    )

    id: uuid.UUID
    type: str
    state: JobState
    # Why a job that has not started waits (`conveyor.ledger.states.Waiting`), else null.
    waiting_for: Waiting | None
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
    # The workflow the job belongs to (`GET /v1/workflows/{id}`), if any.
    workflow_id: uuid.UUID | None = None
    created_at: datetime
    scheduled_for: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    cancel_requested_at: datetime | None
    # The trace of the request that submitted the job (32 hex digits), when it was traced.
    trace_id: str | None


def json_time(value: datetime | None) -> str | None:
    """Format a time in UTC as pydantic's JSON mode does, whatever offset the database used."""
    if value is None:
        return None
    return value.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def job_view(row: JobRow, progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a job's client view (JSON-ready, `JobOut`'s shape) from its row, by column name.

    A plain dict rather than a `JobOut`: building and dumping a pydantic model per job cost
    more than the insert of a batch; a test holds the two to the same JSON.
    """
    state = JobState(row["state"])
    error_type = row.get("error_type")
    error = None
    if error_type and state != JobState.SUCCEEDED:
        error = {"type": error_type, "message": row.get("error_message") or ""}
    started_at = row.get("started_at")
    return {
        "id": str(row["id"]),
        "type": row["type"],
        "state": state.value,
        "waiting_for": row.get("waiting_for"),
        "queue": row["queue"],
        "priority": row["priority"],
        "attempts": row["attempt"],
        "max_attempts": row["max_attempts"],
        "payload": row["payload"],
        "result": row.get("result"),
        "error": error,
        "progress": with_eta(progress, started_at) if state == JobState.RUNNING else None,
        "tags": list(row["tags"] or []),
        "metadata": row["metadata"],
        "schedule_id": _text(row.get("schedule_id")),
        "workflow_id": _text(row.get("workflow_id")),
        "created_at": json_time(row["created_at"]),
        "scheduled_for": json_time(row.get("scheduled_for")),
        "started_at": json_time(started_at),
        "finished_at": json_time(row.get("finished_at")),
        "expires_at": json_time(row.get("expires_at")),
        "cancel_requested_at": json_time(row.get("cancel_requested_at")),
        "trace_id": trace_id_of(row.get("trace_context")),
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
