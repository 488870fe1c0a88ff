"""Schedules: recurring jobs as data, and firing each due occurrence exactly once."""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from conveyor.errors import Conflict, ValidationFailed
from conveyor.ledger.requests import RUN_AT_HORIZON, JobRequest, LimitKey, check_request
from conveyor.ledger.states import UNFINISHED, JobState
from conveyor.ledger.submit import Gate, Submitted, submit_jobs
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job, Schedule
from conveyor.quota import count_unfinished
from conveyor.registry import JobRegistry
from conveyor.telemetry.tracing import span
from conveyor.tenancy import owned

logger = logging.getLogger(__name__)
# Enough to find the latest of the occurrences a long beat outage missed.
MAX_MISSED = 10_000


class ScheduleOptions(BaseModel):
    """Options each fired job gets."""

    model_config = ConfigDict(extra="forbid")
    priority: int | None = Field(default=None, ge=0, le=9)
    queue: str | None = Field(default=None, min_length=1, max_length=100)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    # The bounds of a job's own options (JobOptions): the fired jobs are built from these.
    ttl_seconds: float | None = Field(default=None, gt=0, le=RUN_AT_HORIZON.total_seconds())
    limit_key: LimitKey | None = None


class Timing(BaseModel):
    """When a schedule fires: a cron expression in a time zone, or an interval."""

    cron: str | None = Field(default=None, max_length=200)
    timezone: str | None = Field(default=None, max_length=64)
    interval_seconds: int | None = Field(default=None, ge=1)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                CronSim(value, datetime.now(UTC))
            except CronSimError as exc:
                raise ValueError(f"not a cron expression: {exc}") from exc
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value


class ScheduleSpec(Timing):
    """`POST /v1/schedules`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "name": "nightly-rollup",
                "job_type": "orders.rollup",
                "payload": {},
                "cron": "0 2 * * *",
                "timezone": "Europe/Berlin",
                "misfire_policy": "run_once",
                "overlap_policy": "skip",
            }
        },
    )
    name: str = Field(min_length=1, max_length=200)
    job_type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    misfire_policy: Literal["skip", "run_once"] = "skip"
    overlap_policy: Literal["allow", "skip"] = "allow"
    options: ScheduleOptions = Field(default_factory=ScheduleOptions)

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleSpec:
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("give exactly one of cron and interval_seconds")
        if self.interval_seconds is not None and self.timezone is not None:
            raise ValueError("timezone goes with cron, not interval_seconds")
        return self


class ScheduleChange(Timing):
    """`PATCH /v1/schedules/{id}`: any field of a schedule."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"enabled": False}})
    name: str | None = Field(default=None, min_length=1, max_length=200)
    job_type: str | None = Field(default=None, min_length=1, max_length=200)
    payload: dict[str, Any] | None = None
    enabled: bool | None = None
    misfire_policy: Literal["skip", "run_once"] | None = None
    overlap_policy: Literal["allow", "skip"] | None = None
    options: ScheduleOptions | None = None


def next_occurrence(schedule: Schedule, after: datetime) -> datetime:
    """Return the schedule's first occurrence strictly after `after`, in UTC."""
    if schedule.interval_seconds is not None:
        step = timedelta(seconds=schedule.interval_seconds)
        base = schedule.next_run_at or after
        if base > after:
            return base
        return base + step * (math.floor((after - base) / step) + 1)
    zone = ZoneInfo(schedule.timezone or "UTC")
    # cronsim walks wall-clock time in the zone, so 02:30 daily survives DST changes.
    moment: datetime = next(CronSim(schedule.cron or "", after.astimezone(zone)))
    return moment.astimezone(UTC)


def latest_occurrence(schedule: Schedule, now: datetime) -> datetime:
    """Return the last occurrence at or before `now`, starting from `next_run_at`."""
    latest = schedule.next_run_at
    for _ in range(MAX_MISSED):
        following = next_occurrence(schedule, latest)
        if following > now:
            break
        latest = following
    return latest


def _job_request(schedule: Schedule) -> JobRequest:
    return JobRequest(type=schedule.job_type, payload=schedule.payload, **schedule.options)


def _validate(schedule: Schedule, registry: JobRegistry, default_queue: str, now: datetime) -> None:
    try:
        check_request(registry, _job_request(schedule), default_queue=default_queue, now=now)
    except ValidationFailed as exc:
        for error in exc.errors:
            if error["field"] == "type":
                error["field"] = "job_type"
            elif not error["field"].startswith("payload"):
                error["field"] = f"options.{error['field']}"
        raise


def _flush_unique(session: Session, schedule: Schedule) -> None:
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        raise Conflict(
            f"a schedule named {schedule.name!r} already exists",
            errors=[{"field": "name", "message": "already taken"}],
        ) from exc


def create_schedule(
    session: Session,
    registry: JobRegistry,
    tenant_id: uuid.UUID,
    spec: ScheduleSpec,
    *,
    default_queue: str,
    now: datetime,
) -> Schedule:
    """Store a schedule whose job would pass submit's validation; it fires from its next time."""
    values = spec.model_dump(exclude={"options"})
    schedule = Schedule(tenant_id=tenant_id, options=spec.options.model_dump(exclude_none=True))
    for name, value in values.items():
        setattr(schedule, name, value)
    _validate(schedule, registry, default_queue, now)
    schedule.next_run_at = next_occurrence(schedule, now)
    session.add(schedule)
    _flush_unique(session, schedule)
    return schedule


def get_schedule(session: Session, tenant_id: uuid.UUID, schedule_id: uuid.UUID) -> Schedule:
    """Return one of the tenant's schedules, or `NotFound` (also for another tenant's)."""
    return owned(session, Schedule, schedule_id, tenant_id, "schedule")


def list_schedules(session: Session, tenant_id: uuid.UUID) -> Sequence[Schedule]:
    """Return the tenant's schedules by name."""
    return session.scalars(
        select(Schedule).where(Schedule.tenant_id == tenant_id).order_by(Schedule.name)
    ).all()


def update_schedule(
    session: Session,
    registry: JobRegistry,
    schedule: Schedule,
    change: ScheduleChange,
    *,
    default_queue: str,
    now: datetime,
) -> Schedule:
    """Apply a change, re-validate, and recompute the next run if the timing changed."""
    values = change.model_dump(exclude_unset=True, exclude={"options"})
    if "cron" in values and values["cron"] is not None:
        values.setdefault("interval_seconds", None)
    if "interval_seconds" in values and values["interval_seconds"] is not None:
        values.setdefault("cron", None)
        values.setdefault("timezone", None)
    for name, value in values.items():
        setattr(schedule, name, value)
    if change.options is not None:
        schedule.options = change.options.model_dump(exclude_none=True)
    if (schedule.cron is None) == (schedule.interval_seconds is None):
        raise ValidationFailed(
            "give exactly one of cron and interval_seconds",
            errors=[{"field": "cron", "message": "exactly one of cron and interval_seconds"}],
        )
    _validate(schedule, registry, default_queue, now)
    if {"cron", "timezone", "interval_seconds", "enabled"} & values.keys():
        schedule.next_run_at = now
        schedule.next_run_at = next_occurrence(schedule, now)
    schedule.updated_at = now
    _flush_unique(session, schedule)
    return schedule


def last_job_states(session: Session, schedules: Sequence[Schedule]) -> dict[uuid.UUID, JobState]:
    """Return the state of each schedule's last fired job, in one query."""
    ids = [s.last_job_id for s in schedules if s.last_job_id is not None]
    if not ids:
        return {}
    rows = session.execute(select(Job.id, Job.state).where(Job.id.in_(ids)))
    return {job_id: state for job_id, state in rows}


def fire(
    unit: UnitOfWork,
    registry: JobRegistry,
    schedule: Schedule,
    *,
    default_queue: str,
    now: datetime,
    occurrence: datetime | None,
    gate: Gate | None = None,
    admit: Callable[[int], None] | None = None,
) -> Submitted | None:
    """Submit the schedule's job through the normal submit path (`admit` as `submit_jobs`).

    `None` means this occurrence already has its job: another beat fired it.
    """
    try:
        # A trace of its own per fire: the job's run, published after the pass commits,
        # starts its own trace linked to this one (conveyor.telemetry.tracing).
        with (
            span("conveyor.schedule.fire", {"conveyor.schedule.id": str(schedule.id)}, root=True),
            unit.savepoint(),
        ):
            (job,) = submit_jobs(
                unit,
                registry,
                [_job_request(schedule)],
                tenant_id=schedule.tenant_id,
                default_queue=default_queue,
                now=now,
                schedule_id=schedule.id,
                schedule_occurrence=occurrence,
                gate=gate,
                admit=admit,
            )
    except IntegrityError:
        return None
    schedule.last_job_id = job.id
    return job


def fire_due_schedules(
    unit: UnitOfWork,
    registry: JobRegistry,
    now: datetime,
    *,
    default_queue: str,
    misfire_grace: float,
    max_unfinished: int = 0,
    skipped: Counter[str] | None = None,
    batch_size: int = 100,
    gate: Gate | None = None,
) -> list[Submitted]:
    """Fire every due occurrence once (per the misfire and overlap policies); return the jobs.

    An occurrence whose tenant already has `max_unfinished` unfinished jobs (0: no quota) is
    skipped like a missed one, logged, and counted in `skipped` under "quota".
    """
    session = unit.session
    due = session.scalars(
        select(Schedule)
        .where(Schedule.enabled.is_(True), Schedule.next_run_at <= now)
        .order_by(Schedule.next_run_at)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    ).all()
    states = last_job_states(session, due)
    room = _QuotaRoom(session, max_unfinished)
    fired = []
    for schedule in due:
        # Earlier occurrences beat missed (it was down) are skipped, or folded into one run.
        occurrence = latest_occurrence(schedule, now)
        on_time = now - occurrence <= timedelta(seconds=misfire_grace)
        wanted = on_time or schedule.misfire_policy == "run_once"
        last_state = states.get(schedule.last_job_id) if schedule.last_job_id else None
        busy = last_state in UNFINISHED
        if wanted and not (busy and schedule.overlap_policy == "skip"):
            if room.full(schedule.tenant_id):
                logger.warning(
                    "schedule %s skipped its occurrence at %s: its tenant is at its quota of "
                    "%d unfinished jobs",
                    schedule.id,
                    occurrence.isoformat(),
                    max_unfinished,
                    extra={"tenant_id": str(schedule.tenant_id)},
                )
                if skipped is not None:
                    skipped["quota"] += 1
            elif job := _fire_valid(unit, registry, schedule, default_queue, now, occurrence, gate):
                fired.append(job)
                room.take(schedule.tenant_id)
        schedule.next_run_at = next_occurrence(schedule, now)
    session.flush()
    return fired


def _fire_valid(
    unit: UnitOfWork,
    registry: JobRegistry,
    schedule: Schedule,
    default_queue: str,
    now: datetime,
    occurrence: datetime,
    gate: Gate | None,
) -> Submitted | None:
    """Fire an occurrence, or log why a schedule no longer makes a valid job."""
    try:
        return fire(
            unit,
            registry,
            schedule,
            default_queue=default_queue,
            now=now,
            occurrence=occurrence,
            gate=gate,
        )
    except ValidationFailed:
        # The job type or its model changed since the schedule was written.
        logger.warning("schedule %s no longer makes a valid job", schedule.id, exc_info=True)
        return None


class _QuotaRoom:
    """How many more jobs each tenant may get in one pass; every tenant counted once."""

    def __init__(self, session: Session, limit: int) -> None:
        self._session = session
        self._limit = limit
        self._room: dict[uuid.UUID, int] = {}

    def full(self, tenant_id: uuid.UUID) -> bool:
        """Return whether the tenant is at its quota of unfinished jobs (never, without one)."""
        if self._limit <= 0:
            return False
        if tenant_id not in self._room:
            unfinished = count_unfinished(self._session, tenant_id, self._limit)
            self._room[tenant_id] = self._limit - unfinished
        return self._room[tenant_id] <= 0

    def take(self, tenant_id: uuid.UUID) -> None:
        """Count a job just fired for the tenant."""
        if tenant_id in self._room:
            self._room[tenant_id] -= 1
