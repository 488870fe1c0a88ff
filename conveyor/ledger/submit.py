"""Submitting jobs: the request model with every option, batches, and idempotency keys.

A submit is the ledger's insert: every job and its first event in one statement, its live
view noted on the unit of work, and its message too when it is queued (written with
`published_at` set: the unit publishes it right after the commit).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import String, TextClause, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from conveyor.errors import Conflict, ValidationFailed
from conveyor.ledger.flow import claim_unique_key, wake_dispatcher
from conveyor.ledger.reads import job_row
from conveyor.ledger.states import JobState, Waiting
from conveyor.ledger.transitions import queue_messages
from conveyor.ledger.views import job_view
from conveyor.ledger.work import UnitOfWork
from conveyor.live.store import LiveView
from conveyor.models import IdempotencyKey
from conveyor.registry import JobRegistry, unknown_job_type

# A run time this far in the past is a clock skew, not a mistake; further back is refused.
RUN_AT_SKEW = timedelta(minutes=1)
RUN_AT_HORIZON = timedelta(days=366)
MAX_METADATA_BYTES = 4096
MAX_BATCH = 1000
Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/=-]+$")]
# A limit's name; no colon, which the job types' own limits use (`type:<name>`).
LimitKey = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.=/-]+$")]
UNIQUE_HORIZON = timedelta(days=30)


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
    limit_key: LimitKey | None = Field(
        default=None, description="Count against the tenant's limit of this name (flow control)."
    )
    unique_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="While a job of this type with this key is unfinished (or was submitted "
        "within `unique_for_seconds`), a submit answers 200 with it instead of a new job.",
    )
    unique_for_seconds: float | None = Field(default=None, gt=0, le=UNIQUE_HORIZON.total_seconds())

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
        if self.unique_for_seconds is not None and self.unique_key is None:
            raise ValueError("unique_for_seconds goes with a unique_key")
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
    allow_internal: bool = False,
) -> dict[str, Any]:
    """Validate one request against its type and return the values of its row."""
    try:
        job_type = registry.get(request.type)
        # The one gate for internal types: every submit (API, batch, schedules) passes here,
        # and to a client an internal type does not exist, in the same words as a missing one.
        if job_type.internal and not allow_internal:
            raise unknown_job_type(request.type)
        payload = job_type.parse_payload(request.payload)
    except ValidationFailed as exc:
        prefix = "" if index is None else f"jobs[{index}]."
        for error in exc.errors:
            error["field"] = prefix + error["field"]
        raise
    allowed = job_type.queues(default_queue)
    if request.queue is not None and request.queue not in allowed:
        raise _fail(index, "queue", f"{job_type.name} runs on {', '.join(allowed)} only")
    # In UTC, as the ledger gives them back: a client's offset would make the submit's
    # answer and snapshot differ from every later read (and its ETag).
    run_at = request.run_at and request.run_at.astimezone(UTC)
    if request.delay_seconds:
        run_at = now + timedelta(seconds=request.delay_seconds)
    expires_at = request.expires_at and request.expires_at.astimezone(UTC)
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
        "metadata": request.metadata,
        "callback_url": request.callback_url,
        "schedule_id": schedule_id,
        "schedule_occurrence": schedule_occurrence,
        "attempt": 0,
        "max_attempts": request.max_attempts or job_type.retry.max_attempts,
        "scheduled_for": run_at if delayed else None,
        "expires_at": expires_at,
        "created_at": now,
        "limit_key": request.limit_key,
        "waiting_for": Waiting.SCHEDULE if delayed else None,
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


@dataclass(frozen=True, slots=True)
class Submitted:
    """A job a submit answers with: just inserted, or the one holding its unique key."""

    id: uuid.UUID
    type: str
    queue: str
    state: JobState
    view: dict[str, Any]
    # False when the job already existed (the request's unique key was taken).
    created: bool = True


class Gate(Protocol):
    """Says whether a job may go straight to the broker, or why it waits for the dispatcher."""

    def holds(self, tenant_id: uuid.UUID, queue: str) -> Waiting | None:
        """Return why a job of the tenant in `queue` waits, or None to publish it at once."""


def submit_jobs(
    unit: UnitOfWork,
    registry: JobRegistry,
    requests: Sequence[JobRequest],
    *,
    tenant_id: uuid.UUID,
    default_queue: str,
    now: datetime,
    schedule_id: uuid.UUID | None = None,
    schedule_occurrence: datetime | None = None,
    ids: Sequence[uuid.UUID] | None = None,
    allow_internal: bool = False,
    gate: Gate | None = None,
    admit: Callable[[int], None] | None = None,
) -> list[Submitted]:
    """Validate every request, then insert all the jobs and their first events, or none.

    Internal job types are refused (`UnknownJobType`) unless `allow_internal`, which only
    the platform itself may pass (the ledger inserts webhook deliveries on its own).
    `admit` gets the number of jobs once all are valid, before anything is written, and
    may refuse them by raising (the API holds them to the tenant's quota there).

    A request whose unique key a live job holds gets that job (`created=False`). Scheduled
    jobs wait for the promoter. A queued job goes straight to the broker unless something
    may hold it back: a limit it counts against (its `limit_key`, its type's), or what
    `gate` says (a paused or busy queue); then it waits for the dispatcher, `waiting_for`
    saying why. One published at once is written with `published_at` set already (its
    publish is due now): the unit of work publishes it right after the commit, at no
    further statement, and a publish that fails clears it again for the dispatcher.
    Should the process die between the commit and the publish, the reconciler re-drives
    the job (DESIGN.md, "The ledger").
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
            allow_internal=allow_internal,
        )
        for n, request in enumerate(requests)
    ]
    holders = _unique_holders(unit, requests, rows, tenant_id, now)
    new = [row for row in rows if row["id"] not in holders]
    if admit is not None and new:
        admit(len(new))
    for row in new:
        if row["state"] == JobState.QUEUED:
            row["waiting_for"] = _held(registry, row, gate)
        row["published_at"] = (
            now if row["state"] == JobState.QUEUED and row["waiting_for"] is None else None
        )
    views: dict[uuid.UUID, Submitted] = {}
    if new:
        # One statement for any number of jobs and their first events: the rows travel as
        # one JSON document that PostgreSQL unpacks (jsonb_populate_recordset). SQLAlchemy's
        # per-row, per-column parameter processing of a multi-row insert cost a quarter of
        # a millisecond a job.
        document = json.dumps([_ledger_values(row) for row in new], separators=(",", ":"))
        versions = {
            job_id: version
            for job_id, version in unit.session.execute(_insert_statement(), {"rows": document})
        }
        for row in new:
            view = job_view(row)
            views[row["id"]] = Submitted(row["id"], row["type"], row["queue"], row["state"], view)
            unit.show([LiveView.of(row["id"], versions[row["id"]], tenant_id, view)])
        queue_messages(unit, [row for row in new if row["published_at"] is not None])
        if any(row["published_at"] is None and row["state"] == JobState.QUEUED for row in new):
            wake_dispatcher(unit)
    return [_answer(unit, row, holders, views, tenant_id) for row in rows]


def _held(registry: JobRegistry, row: dict[str, Any], gate: Gate | None) -> Waiting | None:
    """Return why a queued job must wait for the dispatcher, or None to publish it at once."""
    if row["limit_key"] is not None or registry.get(row["type"]).limit is not None:
        return Waiting.LIMIT
    return gate.holds(row["tenant_id"], row["queue"]) if gate is not None else None


def _unique_holders(
    unit: UnitOfWork,
    requests: Sequence[JobRequest],
    rows: Sequence[dict[str, Any]],
    tenant_id: uuid.UUID,
    now: datetime,
) -> dict[uuid.UUID, uuid.UUID]:
    """Take the unique keys the requests ask for; return, per new job, the job holding its key."""
    holders = {}
    for request, row in zip(requests, rows, strict=True):
        if request.unique_key is None:
            continue
        window = request.unique_for_seconds
        holder = claim_unique_key(
            unit,
            tenant_id,
            row["type"],
            request.unique_key,
            row["id"],
            held_until=now + timedelta(seconds=window) if window else None,
            now=now,
        )
        if holder is not None:
            holders[row["id"]] = holder
    return holders


def _answer(
    unit: UnitOfWork,
    row: dict[str, Any],
    holders: dict[uuid.UUID, uuid.UUID],
    views: dict[uuid.UUID, Submitted],
    tenant_id: uuid.UUID,
) -> Submitted:
    """Return what a submit answers for one request: its new job, or the one holding its key."""
    holder = holders.get(row["id"])
    if holder is None:
        return views[row["id"]]
    if holder in views:  # an earlier request of the same batch took the key
        return dataclasses.replace(views[holder], created=False)
    existing = job_row(unit.session, holder, tenant_id)
    return Submitted(
        existing["id"],
        existing["type"],
        existing["queue"],
        existing["state"],
        job_view(existing),
        False,
    )


def _ledger_values(row: dict[str, Any]) -> dict[str, Any]:
    """Return a row's values as JSON PostgreSQL casts to the columns."""
    return {
        column: value.isoformat()
        if isinstance(value, datetime)
        else str(value)
        if isinstance(value, uuid.UUID)
        else value
        for column, value in ((column, row[column]) for column in _COLUMNS)
    }


# The columns submit writes; the others (the finish's, the worker's) take their defaults.
_COLUMNS = (
    "id",
    "tenant_id",
    "type",
    "queue",
    "state",
    "priority",
    "payload",
    "tags",
    "metadata",
    "callback_url",
    "schedule_id",
    "schedule_occurrence",
    "attempt",
    "max_attempts",
    "scheduled_for",
    "expires_at",
    "created_at",
    "published_at",
    "limit_key",
    "waiting_for",
)


@functools.cache
def _insert_statement() -> TextClause:
    """Build, once, the statement inserting jobs from a JSON array, and their first events."""
    columns = ", ".join(f'"{name}"' for name in _COLUMNS)
    # Each job comes back with its version, which its live view carries.
    return text(
        f"""
        WITH inserted AS (
            INSERT INTO jobs ({columns})
            SELECT {columns} FROM jsonb_populate_recordset(NULL::jobs, CAST(:rows AS jsonb))
            RETURNING id, state, version
        ), first_events AS (
            INSERT INTO job_events (job_id, from_state, to_state, attempt)
            SELECT id, NULL, state, 0 FROM inserted
        )
        SELECT id, version FROM inserted
        """  # noqa: S608 - the columns are the model's own names, not input
    ).bindparams(bindparam("rows", type_=String()))


def claim_idempotency_key(
    unit: UnitOfWork,
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
    claimed = unit.session.execute(
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
    existing = unit.session.execute(
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


def point_idempotency_key(
    unit: UnitOfWork, tenant_id: uuid.UUID, key: str, job_id: uuid.UUID
) -> None:
    """Make an Idempotency-Key just claimed name another job (the one its unique key found)."""
    unit.session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
        .values(job_id=job_id)
    )
