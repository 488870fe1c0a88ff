"""The job ledger and the identities that own it, as typed SQLAlchemy models."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from conveyor.ledger.states import JobState

# Named constraints keep Alembic migrations deterministic.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

STATE_VALUES = ", ".join(f"'{s.value}'" for s in JobState)


class StateType(TypeDecorator[JobState]):
    """A job state stored as its name (a checked VARCHAR), read back as a `JobState`."""

    impl = String(20)
    cache_ok = True

    def process_bind_param(self, value: JobState | str | None, _dialect: Dialect) -> str | None:
        """Store the state's name."""
        return None if value is None else JobState(value).value

    def process_result_value(self, value: str | None, _dialect: Dialect) -> JobState | None:
        """Read the name back as the enum member."""
        return None if value is None else JobState(value)


class Base(DeclarativeBase):
    """Declarative base with Conveyor's naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012
        dict[str, Any]: JSONB,
        datetime: DateTime(timezone=True),
        JobState: StateType(),
    }


class Tenant(Base):
    """An organisation; every job, user and key belongs to exactly one."""

    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class User(Base):
    """A person who signs in to a tenant."""

    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(20))
    is_active: Mapped[bool] = mapped_column(default=True, server_default="true")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class ApiKey(Base):
    """A service credential; only a keyed hash of its secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    # The key that created this one, if a key did: revoking it revokes this one too.
    created_by_key_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_used_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Job(Base):
    """One unit of work in the ledger; PostgreSQL is its source of truth."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"state IN ({STATE_VALUES})", name="state"),
        CheckConstraint("attempt >= 0", name="attempt"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
        # Keyset pagination of a tenant's jobs, newest first.
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        # The same, by state: a list filtered by a rare state must not scan the history.
        Index("ix_jobs_tenant_state_created", "tenant_id", "state", "created_at", "id"),
        # A tenant's queued and running jobs per queue (queue stats): small, unfinished only.
        Index(
            "ix_jobs_tenant_active_queue",
            "tenant_id",
            "queue",
            postgresql_where="state IN ('queued', 'running')",
        ),
        # The job list's tag filter; most jobs have no tags, and only tagged ones are indexed.
        Index("ix_jobs_tags", "tags", postgresql_using="gin", postgresql_where="tags <> '{}'"),
        Index(
            "uq_jobs_schedule_occurrence",
            "schedule_id",
            "schedule_occurrence",
            unique=True,
            postgresql_where="schedule_occurrence IS NOT NULL",
        ),
        # A tenant's recent finishes: the quota's drain rate and the console's activity. Only
        # finished jobs, so a job enters it once (the quota counts unfinished ones by state).
        Index(
            "ix_jobs_tenant_finished",
            "tenant_id",
            "finished_at",
            postgresql_where="finished_at IS NOT NULL",
        ),
        # Retention pruning walks finished jobs oldest first.
        Index("ix_jobs_finished", "finished_at", postgresql_where="finished_at IS NOT NULL"),
        # The promoter scans only unfinished work, so the index holds only that.
        Index(
            "ix_jobs_pending",
            "state",
            "scheduled_for",
            postgresql_where="state IN ('scheduled', 'queued', 'retrying')",
        ),
        # The reaper looks for running jobs whose heartbeat went quiet.
        Index("ix_jobs_running_heartbeat", "heartbeat_at", postgresql_where="state = 'running'"),
        # The dispatcher's work: queued jobs not handed to the broker yet, per queue and
        # tenant in the order they run (priority, then submit order).
        Index(
            "ix_jobs_undispatched",
            "queue",
            "tenant_id",
            text("priority DESC"),
            "created_at",
            "id",
            postgresql_where="state = 'queued' AND published_at IS NULL",
        ),
        # Jobs handed to the broker and not claimed yet: the queues' in-flight work.
        Index(
            "ix_jobs_in_flight",
            "queue",
            "limit_key",
            postgresql_where="state = 'queued' AND published_at IS NOT NULL",
        ),
        # A workflow's jobs, and their refs (unique within it).
        Index(
            "uq_jobs_workflow_ref",
            "workflow_id",
            "workflow_ref",
            unique=True,
            postgresql_where="workflow_id IS NOT NULL",
        ),
        CheckConstraint("dependencies_left >= 0", name="dependencies_left"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(100))
    state: Mapped[JobState]
    priority: Mapped[int] = mapped_column(SmallInteger, default=0, server_default="0")
    payload: Mapped[dict[str, Any]]
    tags: Mapped[list[str]] = mapped_column(ARRAY(String(64)), default=list, server_default="{}")
    # `metadata` is taken by SQLAlchemy's declarative base; the column keeps the API's name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict, server_default="{}")
    schedule_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("schedules.id", ondelete="SET NULL")
    )
    # The occurrence a schedule fired this job for; unique per schedule, so two beats
    # that both fire one occurrence still create one job.
    schedule_occurrence: Mapped[datetime | None]
    # Where to POST the job's public view when it finishes (unsigned; see webhooks).
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    result: Mapped[dict[str, Any] | None]
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(SmallInteger, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")
    scheduled_for: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # When the job's message went (or, for an API submit, was due) to the broker; NULL
    # while a publish is owed: the promoter publishes queued jobs left NULL for 10 s, and
    # the reconciler checks the broker for queued jobs stamped `reconcile_after` ago.
    published_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200))
    # A fresh id written by each claim; the attempt's finishes and heartbeats name it, so a
    # claim PostgreSQL lost (it commits without waiting for its WAL flush) leaves its run
    # nothing to finish, even after a new claim took the same attempt number.
    claim_token: Mapped[uuid.UUID | None]
    # The tenant's limit the job counts against (flow control), and why it has not started
    # yet when something holds it back (`conveyor.ledger.states.Waiting`).
    limit_key: Mapped[str | None] = mapped_column(String(100))
    waiting_for: Mapped[str | None] = mapped_column(String(20))
    # Workflows (conveyor.ledger.dependencies): the workflow the job belongs to and its ref
    # there; how many of its dependencies it still waits for (counted down as they finish,
    # never recounted, so a 10,000-way fan-in costs one update per parent); whether other
    # jobs depend on it (a finish with none costs nothing more); and whether it runs when a
    # dependency ends dead (`run`) instead of being cancelled (NULL).
    workflow_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflows.id", ondelete="SET NULL")
    )
    workflow_ref: Mapped[str | None] = mapped_column(String(100))
    dependencies_left: Mapped[int] = mapped_column(default=0, server_default="0")
    has_dependents: Mapped[bool] = mapped_column(default=False, server_default="false")
    on_dependency_failure: Mapped[str | None] = mapped_column(String(10))
    # Grows by one with every ledger write that changes the job's client view: it versions
    # the job's live view in Redis (conveyor.live.store), so an older one never wins.
    version: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    # The W3C trace context (`traceparent`, `tracestate`) of the request or span that
    # submitted the job, while tracing is on: a job published later starts its own trace
    # linked to this one (conveyor.telemetry.tracing). The view shows its trace id.
    trace_context: Mapped[dict[str, Any] | None]


class JobDependency(Base):
    """One edge of a dependency graph: `job_id` starts only after `depends_on_id` succeeded."""

    __tablename__ = "job_dependencies"
    # The parent's side leads the key: a finish looks up its dependents by it.
    __table_args__ = (Index("ix_job_dependencies_job_id", "job_id"),)

    depends_on_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )


class Workflow(Base):
    """A named graph of jobs submitted together; it finishes when every job has.

    `unfinished` counts its jobs not finished yet (the ledger counts it down in the
    transaction of each finish, and up on a retry or a fan-out), so the last finish, and
    only it, sees zero and settles the workflow's state.
    """

    __tablename__ = "workflows"
    __table_args__ = (
        CheckConstraint("state IN ('running', 'succeeded', 'failed', 'cancelled')", name="state"),
        CheckConstraint("unfinished >= 0", name="unfinished"),
        # Keyset pagination of a tenant's workflows, newest first.
        Index("ix_workflows_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20), default="running", server_default="running")
    total: Mapped[int] = mapped_column(default=0, server_default="0")
    unfinished: Mapped[int] = mapped_column(default=0, server_default="0")
    cancel_requested_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    finished_at: Mapped[datetime | None]


class JobEvent(Base):
    """One transition in a job's history."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    from_state: Mapped[JobState | None]
    to_state: Mapped[JobState]
    attempt: Mapped[int] = mapped_column(SmallInteger)
    detail: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class RefreshToken(Base):
    """One issued refresh token; tokens rotated from one login share a family."""

    __tablename__ = "refresh_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    family_id: Mapped[uuid.UUID] = mapped_column(index=True)
    # SHA-256 of the token's jti: a leaked table cannot be replayed.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class IdempotencyKey(Base):
    """A client's `Idempotency-Key`, remembered per tenant for the retention window."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # SHA-256 of the canonical request, to tell a retry from a different request.
    request_hash: Mapped[str] = mapped_column(String(64))
    # No foreign key: the job may be pruned before its key, and the key is claimed first.
    job_id: Mapped[uuid.UUID]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


class Schedule(Base):
    """A recurring job: a cron expression in a time zone, or a fixed interval."""

    __tablename__ = "schedules"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        CheckConstraint("(cron IS NULL) <> (interval_seconds IS NULL)", name="one_timing"),
        CheckConstraint("interval_seconds IS NULL OR interval_seconds >= 1", name="interval"),
        # Beat looks for enabled schedules that are due.
        Index("ix_schedules_due", "next_run_at", postgresql_where="enabled"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    job_type: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]]
    cron: Mapped[str | None] = mapped_column(String(200))
    timezone: Mapped[str | None] = mapped_column(String(64))
    interval_seconds: Mapped[int | None]
    enabled: Mapped[bool] = mapped_column(default=True, server_default="true")
    misfire_policy: Mapped[str] = mapped_column(String(20), default="skip", server_default="skip")
    overlap_policy: Mapped[str] = mapped_column(String(20), default="allow", server_default="allow")
    options: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    next_run_at: Mapped[datetime]
    last_job_id: Mapped[uuid.UUID | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Upload(Base):
    """A file a client uploaded for a job to read; its bytes live in `upload_chunks`."""

    __tablename__ = "uploads"
    # The storage quota sums a tenant's sizes: the index alone can answer it.
    __table_args__ = (Index("ix_uploads_tenant_size", "tenant_id", "size"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class UploadChunk(Base):
    """One slice of an upload, so readers stream it instead of loading it whole."""

    __tablename__ = "upload_chunks"

    upload_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Artifact(Base):
    """A file a job produced; it lives and dies with its job (retention included)."""

    __tablename__ = "artifacts"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class ArtifactChunk(Base):
    """One slice of an artifact, written and read as a stream."""

    __tablename__ = "artifact_chunks"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("artifacts.job_id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class AuditEntry(Base):
    """One action a person or key took: cancel, retry, delete, change."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    actor_user_id: Mapped[uuid.UUID | None]
    actor_api_key_id: Mapped[uuid.UUID | None]
    action: Mapped[str] = mapped_column(String(50))
    target_type: Mapped[str] = mapped_column(String(50))
    target_id: Mapped[str] = mapped_column(String(100))
    detail: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Webhook(Base):
    """A tenant's endpoint for job events; its secret signs every delivery."""

    __tablename__ = "webhooks"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(ARRAY(String(50)))
    # Kept to sign deliveries (HMAC needs it); shown to the tenant once, at creation.
    secret: Mapped[str] = mapped_column(String(100))
    enabled: Mapped[bool] = mapped_column(default=True, server_default="true")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Limit(Base):
    """How many jobs of one key may run at once, and how often they may start.

    A tenant's limit is named by the key its jobs give (`limit_key`); a job type's limit,
    declared in code, applies to its jobs of every tenant and has no tenant. `running`
    counts the jobs that hold a slot now (the ledger takes and frees them in the same
    statements that move jobs into and out of `running`); `starts` keeps the latest start
    times the rate allows, oldest first.
    """

    __tablename__ = "limits"
    __table_args__ = (
        Index(
            "uq_limits_tenant_key",
            "tenant_id",
            "key",
            unique=True,
            postgresql_where="tenant_id IS NOT NULL",
        ),
        Index("uq_limits_global_key", "key", unique=True, postgresql_where="tenant_id IS NULL"),
        CheckConstraint("max_running IS NULL OR max_running >= 1", name="max_running"),
        CheckConstraint("per_second IS NULL OR per_second > 0", name="per_second"),
        CheckConstraint("running >= 0", name="running"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE")
    )
    key: Mapped[str] = mapped_column(String(100))
    max_running: Mapped[int | None]
    per_second: Mapped[float | None]
    running: Mapped[int] = mapped_column(default=0, server_default="0")
    starts: Mapped[list[datetime]] = mapped_column(
        ARRAY(DateTime(timezone=True)), default=list, server_default="{}"
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class QueuePause(Base):
    """A queue whose jobs do not start: one tenant's, or every tenant's (no tenant)."""

    __tablename__ = "queue_pauses"
    __table_args__ = (
        Index(
            "uq_queue_pauses_tenant_queue",
            "tenant_id",
            "queue",
            unique=True,
            postgresql_where="tenant_id IS NOT NULL",
        ),
        Index(
            "uq_queue_pauses_global_queue",
            "queue",
            unique=True,
            postgresql_where="tenant_id IS NULL",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE")
    )
    queue: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class UniqueKey(Base):
    """Which job holds a tenant's unique key for a job type, and until when at least.

    The ledger releases the key in the statement that finishes its job (and takes it
    back if a person retries that job), so a submit decides on this row alone.
    """

    __tablename__ = "unique_keys"
    __table_args__ = (Index("ix_unique_keys_job_id", "job_id"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    type: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    # No foreign key: the job may be pruned; a missing job holds nothing.
    job_id: Mapped[uuid.UUID]
    # The key stays taken until then even once its job has finished (`unique_for_seconds`).
    held_until: Mapped[datetime | None]
    # When the holding job finished; NULL while it has not.
    released_at: Mapped[datetime | None]
