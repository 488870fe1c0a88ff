"""What a submit asks for: the request model with every option, validated against its type."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from conveyor.errors import ValidationFailed
from conveyor.ledger.states import JobState, Waiting
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


class JobOptions(BaseModel):
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
    on_dependency_failure: Literal["cancel", "run"] | None = Field(
        default=None,
        description="When a dependency ends failed, cancelled or expired: `cancel` this job "
        "(the default) or `run` it anyway.",
    )

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must serialise to at most {MAX_METADATA_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _one_way_to_say_when(self) -> JobOptions:
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


class JobRequest(JobOptions):
    """One job to submit on its own, which may wait for other jobs of its tenant."""

    depends_on: list[uuid.UUID] = Field(
        default_factory=list,
        max_length=MAX_BATCH,
        description="Ids of the tenant's jobs that must succeed before this one starts.",
    )


def invalid_field(index: int | None, field: str, message: str) -> ValidationFailed:
    """Return a validation error naming `field` (of the `index`th job of a batch)."""
    where = field if index is None else f"jobs[{index}].{field}"
    return ValidationFailed(message, errors=[{"field": where, "message": message}])


def job_values(
    registry: JobRegistry,
    request: JobOptions,
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
        raise invalid_field(index, "queue", f"{job_type.name} runs on {', '.join(allowed)} only")
    # In UTC, as the ledger gives them back: a client's offset would make the submit's
    # answer and snapshot differ from every later read (and its ETag).
    run_at = request.run_at and request.run_at.astimezone(UTC)
    if request.delay_seconds:
        run_at = now + timedelta(seconds=request.delay_seconds)
    expires_at = request.expires_at and request.expires_at.astimezone(UTC)
    if request.ttl_seconds is not None:
        expires_at = (run_at or now) + timedelta(seconds=request.ttl_seconds)
    if expires_at is not None and expires_at <= max(run_at or now, now):
        raise invalid_field(index, "expires_at", "the job would expire before it could start")
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
        "workflow_id": None,
        "workflow_ref": None,
        "dependencies_left": 0,
        "has_dependents": False,
        "on_dependency_failure": "run" if request.on_dependency_failure == "run" else None,
    }


def check_request(
    registry: JobRegistry, request: JobRequest, *, default_queue: str, now: datetime
) -> None:
    """Validate a request as submit would, without writing anything (schedules store them)."""
    job_values(
        registry,
        request,
        index=None,
        job_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        default_queue=default_queue,
        now=now,
        schedule_id=None,
    )
