"""Submitting jobs: the request model with every option, batches, and idempotency keys."""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, cast

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import Insert, Table, bindparam, insert, literal, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from conveyor.errors import Conflict, ValidationFailed
from conveyor.models import IdempotencyKey, Job, JobEvent
from conveyor.registry import JobRegistry
from conveyor.snapshots import Snapshot, note
from conveyor.states import JobState

# A run time this far in the past is a clock skew, not a mistake; further back is refused.
RUN_AT_SKEW = timedelta(minutes=1)
RUN_AT_HORIZON = timedelta(days=366)
MAX_METADATA_BYTES = 4096
MAX_BATCH = 1000
Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/=-]+$")]


class JobRequest(BaseModel):
    """One job to submit: its type and payload, and how and when it should run."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "type": "system.sleep",
                "payload": {"seconds": 2},
                "priority": 5,
                "tags": ["demo"],
                "metadata": {"requested_by": "docs"},
            }
        },
    )

    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = Field(default=None, ge=0, le=9, description="9 runs first")
    queue: str | None = Field(default=None, min_length=1, max_length=100)
    run_at: AwareDatetime | None = None
    delay_seconds: float | None = Field(default=None, ge=0, le=RUN_AT_HORIZON.total_seconds())
    expires_at: AwareDatetime | None = None
    ttl_seconds: float | None = Field(default=None, gt=0, le=RUN_AT_HORIZON.total_seconds())
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    tags: list[Tag] = Field(default_factory=list, max_length=10)
    metadata: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://\S+$")

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must serialise to at most {MAX_METADATA_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _one_way_to_say_when(self) -> JobRequest:
        if self.run_at is not None and self.delay_seconds is not None:
            raise ValueError("give run_at or delay_seconds, not both")
        if self.expires_at is not None and self.ttl_seconds is not None:
            raise ValueError("give expires_at or ttl_seconds, not both")
        now = datetime.now(UTC)
        if self.run_at is not None and not now - RUN_AT_SKEW <= self.run_at <= now + RUN_AT_HORIZON:
            raise ValueError("run_at must be from now up to a year ahead")
        return self

    def fingerprint(self) -> str:
        """Return a hash of the request, to tell an idempotent retry from a different request."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _fail(index: int | None, field: str, message: str) -> ValidationFailed:
    where = field if index is None else f"jobs[{index}].{field}"
    return ValidationFailed(message, errors=[{"field": where, "message": message}])


def _job_row(
    registry: JobRegistry,
    request: JobRequest,
    *,
    index: int | None,
    job_id: uuid.UUID,
    tenant_id: uuid.UUID,
    default_queue: str,
    now: datetime,
    schedule_id: uuid.UUID | None,
    schedule_occurrence: datetime | None = None,
) -> dict[str, Any]:
    """Validate one request against its type and return the values of its row."""
    try:
        job_type = registry.get(request.type)
        payload = job_type.parse_payload(request.payload)
    except ValidationFailed as exc:
        prefix = "" if index is None else f"jobs[{index}]."
        for error in exc.errors:
            error["field"] = prefix + error["field"]
        raise
    allowed = job_type.queues(default_queue)
    if request.queue is not None and request.queue not in allowed:
        raise _fail(index, "queue", f"{job_type.name} runs on {', '.join(allowed)} only")
    run_at = request.run_at
    if request.delay_seconds:
        run_at = now + timedelta(seconds=request.delay_seconds)
    expires_at = request.expires_at
    if request.ttl_seconds is not None:
        expires_at = (run_at or now) + timedelta(seconds=request.ttl_seconds)
    if expires_at is not None and expires_at <= max(run_at or now, now):
        raise _fail(index, "expires_at", "the job would expire before it could start")
    delayed = run_at is not None and run_at > now
    return {
        "id": job_id,
        "tenant_id": tenant_id,
        "type": job_type.name,
        "queue": request.queue or allowed[0],
        "state": JobState.SCHEDULED if delayed else JobState.QUEUED,
        "priority": job_type.priority if request.priority is None else request.priority,
        "payload": payload.model_dump(mode="json", by_alias=True),
        "tags": request.tags,
        "meta": request.metadata,
        "callback_url": request.callback_url,
        "schedule_id": schedule_id,
        "schedule_occurrence": schedule_occurrence,
        "attempt": 0,
        "max_attempts": request.max_attempts or job_type.retry.max_attempts,
        "scheduled_for": run_at if delayed else None,
        "expires_at": expires_at,
        "created_at": now,
    }


def check_request(
    registry: JobRegistry, request: JobRequest, *, default_queue: str, now: datetime
) -> None:
    """Validate a request as submit would, without writing anything (schedules store them)."""
    _job_row(
        registry,
        request,
        index=None,
        job_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        default_queue=default_queue,
        now=now,
        schedule_id=None,
    )


def submit_jobs(
    session: Session,
    registry: JobRegistry,
    requests: Sequence[JobRequest],
    *,
    tenant_id: uuid.UUID,
    default_queue: str,
    now: datetime,
    schedule_id: uuid.UUID | None = None,
    schedule_occurrence: datetime | None = None,
    ids: Sequence[uuid.UUID] | None = None,
) -> list[Job]:
    """Validate every request, then insert all the jobs and their first events, or none.

    Queued jobs are for the caller to publish after its commit; scheduled ones wait for
    the promoter. The jobs returned are transient copies of the rows, not in the session.
    """
    if len(requests) > MAX_BATCH:
        raise _fail(None, "jobs", f"at most {MAX_BATCH} jobs in one batch")
    batch = len(requests) > 1
    ids = ids or [uuid.uuid4() for _ in requests]
    rows = [
        _job_row(
            registry,
            request,
            index=n if batch else None,
            job_id=ids[n],
            tenant_id=tenant_id,
            default_queue=default_queue,
            now=now,
            schedule_id=schedule_id,
            schedule_occurrence=schedule_occurrence,
        )
        for n, request in enumerate(requests)
    ]
    # Core statements, not the ORM unit of work (a third of a batch's time went to
    # flushing); the returned jobs are plain transient copies of the rows.
    if len(rows) == 1:
        # The job and its first event in one statement: one round trip fewer per submit.
        (row,) = rows
        stmt = _insert_one_statement(tuple(row))
        params = {f"p_{key}": value for key, value in row.items()}
        event_ids: dict[uuid.UUID, int] = {
            job_id: event_id for job_id, event_id in session.execute(stmt, params)
        }
    else:
        session.execute(insert(Job), rows)
        event_ids = {
            job_id: event_id
            for job_id, event_id in session.execute(
                insert(JobEvent).returning(JobEvent.job_id, JobEvent.id),
                [
                    {"job_id": r["id"], "from_state": None, "to_state": r["state"], "attempt": 0}
                    for r in rows
                ],
            )
        }
    jobs = [Job(**row) for row in rows]
    note(session, [Snapshot.of(job, event_ids[job.id]) for job in jobs])
    return jobs


@functools.cache
def _insert_one_statement(keys: tuple[str, ...]) -> Insert:
    """Build, once per set of columns, the statement inserting one job and its first event."""
    columns = {key: Job.__mapper__.attrs[key].columns[0] for key in keys}
    values = {column: bindparam(f"p_{key}", type_=column.type) for key, column in columns.items()}
    # Core tables, not the ORM entities: executed with parameters, an ORM insert would be
    # taken for a bulk insert of those parameters.
    jobs, events = cast("Table", Job.__table__), cast("Table", JobEvent.__table__)
    inserted = insert(jobs).values(values).returning(jobs.c.id, jobs.c.state).cte("inserted")
    return (
        insert(events)
        .from_select(
            ["job_id", "from_state", "to_state", "attempt"],
            select(
                inserted.c.id,
                literal(None, JobEvent.from_state.type),
                inserted.c.state,
                literal(0, JobEvent.attempt.type),
            ),
        )
        .returning(events.c.job_id, events.c.id)
    )


def claim_idempotency_key(
    session: Session,
    tenant_id: uuid.UUID,
    key: str,
    fingerprint: str,
    job_id: uuid.UUID,
    *,
    now: datetime,
    retention: timedelta,
) -> uuid.UUID | None:
    """Claim `key` for a new job, or return the job an earlier identical request created.

    Concurrent claims of one key serialise on its primary key: the loser waits for the
    winner's commit and then sees its row. A key older than `retention` is reused.
    A different request under a live key is a `Conflict`.
    """
    claimed = session.execute(
        pg_insert(IdempotencyKey)
        .values(
            tenant_id=tenant_id, key=key, request_hash=fingerprint, job_id=job_id, created_at=now
        )
        .on_conflict_do_update(
            index_elements=[IdempotencyKey.tenant_id, IdempotencyKey.key],
            set_={"request_hash": fingerprint, "job_id": job_id, "created_at": now},
            where=IdempotencyKey.created_at < now - retention,
        )
        .returning(IdempotencyKey.job_id)
    ).scalar_one_or_none()
    if claimed is not None:
        return None
    existing = session.execute(
        select(IdempotencyKey.request_hash, IdempotencyKey.job_id).where(
            IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key
        )
    ).one()
    if existing.request_hash != fingerprint:
        raise Conflict(
            "this Idempotency-Key was used for a different request",
            errors=[{"field": "Idempotency-Key", "message": "reused with another request"}],
        )
    existing_job: uuid.UUID = existing.job_id
    return existing_job
