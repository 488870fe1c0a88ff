"""`/v1/schedules`: recurring jobs, managed as data; beat picks changes up on its next pass."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from flask import Response, jsonify, url_for
from pydantic import BaseModel

from api.admission import admitting
from api.auth import current_principal, requires
from api.job_views import shown
from api.openapi import (
    JSON_BODY,
    LOCATION,
    ObjectId,
    described,
    empty,
    responses,
    secured_blueprint,
)
from api.requests import parse_id
from api.services import services
from conveyor.audit import audit
from conveyor.auth.roles import Permission
from conveyor.errors import Conflict
from conveyor.ledger.states import JobState
from conveyor.ledger.upkeep import detach_schedule
from conveyor.ledger.views import JobOut
from conveyor.models import Schedule
from conveyor.schedules import (
    ScheduleChange,
    ScheduleOptions,
    ScheduleSpec,
    create_schedule,
    fire,
    get_schedule,
    last_job_states,
    list_schedules,
    update_schedule,
)

bp = secured_blueprint("schedules", __name__, "schedules", "/v1/schedules")


class ScheduleOut(BaseModel):
    """A schedule, with its next run and the state of the last job it fired."""

    id: uuid.UUID
    name: str
    job_type: str
    payload: dict[str, Any]
    cron: str | None
    timezone: str | None
    interval_seconds: int | None
    enabled: bool
    misfire_policy: Literal["skip", "run_once"]
    overlap_policy: Literal["allow", "skip"]
    options: ScheduleOptions
    next_run_at: datetime
    last_job_id: uuid.UUID | None
    last_job_state: str | None


class ScheduleList(BaseModel):
    """`GET /v1/schedules`."""

    items: list[ScheduleOut]


class SchedulePath(BaseModel):
    """A schedule's id in the path."""

    schedule_id: ObjectId


def _out(schedule: Schedule, states: dict[uuid.UUID, JobState]) -> dict[str, Any]:
    last_state = states.get(schedule.last_job_id) if schedule.last_job_id else None
    return {
        "id": str(schedule.id),
        "name": schedule.name,
        "job_type": schedule.job_type,
        "payload": schedule.payload,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "interval_seconds": schedule.interval_seconds,
        "enabled": schedule.enabled,
        "misfire_policy": schedule.misfire_policy,
        "overlap_policy": schedule.overlap_policy,
        "options": schedule.options,
        "next_run_at": schedule.next_run_at.isoformat(),
        "last_job_id": str(schedule.last_job_id) if schedule.last_job_id else None,
        "last_job_state": last_state,
    }


def schedules_out() -> list[dict[str, Any]]:
    """Return the caller's tenant's schedules with their next run and last job's state."""
    with services().sessions() as session:
        schedules = list_schedules(session, current_principal().tenant_id)
        states = last_job_states(session, schedules)
        return [_out(schedule, states) for schedule in schedules]


def change_schedule(schedule_id: uuid.UUID, body: ScheduleChange) -> dict[str, Any]:
    """Change the caller's schedule, audited; a new timing recomputes the next run."""
    principal = current_principal()
    svc = services()
    with svc.sessions.begin() as session:
        schedule = get_schedule(session, principal.tenant_id, schedule_id)
        update_schedule(
            session,
            svc.registry,
            schedule,
            body,
            default_queue=svc.settings.default_queue,
            now=datetime.now(UTC),
        )
        changed = body.model_dump(mode="json", exclude_unset=True)
        audit(session, principal, "schedule.change", "schedule", schedule.id, changed)
        return _out(schedule, last_job_states(session, [schedule]))


def trigger_schedule(schedule_id: uuid.UUID) -> dict[str, Any]:
    """Fire the caller's schedule's job now, audited; return the job as the caller sees it."""
    principal = current_principal()
    svc = services()
    with svc.work.begin() as unit:
        schedule = get_schedule(unit.session, principal.tenant_id, schedule_id)
        job = fire(
            unit,
            svc.registry,
            schedule,
            default_queue=svc.settings.default_queue,
            now=datetime.now(UTC),
            occurrence=None,
            gate=svc.gate,
            admit=admitting(unit, principal.tenant_id),
        )
        if job is None:  # only occurrences have a unique key; a trigger has none
            raise Conflict("the schedule fired no job")
        audit(
            unit.session,
            principal,
            "schedule.trigger",
            "schedule",
            schedule.id,
            {"job": str(job.id)},
        )
    return shown(job.view)


@bp.post(
    "",
    responses=responses({201: described(ScheduleOut, "Created.", LOCATION)}, 404, 409, *JSON_BODY),
)
@requires(Permission.MANAGE_SCHEDULES)
def create(body: ScheduleSpec) -> tuple[Response, int, dict[str, str]]:
    """Create a schedule; its job type, payload and options are validated now."""
    principal = current_principal()
    svc = services()
    with svc.sessions.begin() as session:
        schedule = create_schedule(
            session,
            svc.registry,
            principal.tenant_id,
            body,
            default_queue=svc.settings.default_queue,
            now=datetime.now(UTC),
        )
        audit(session, principal, "schedule.create", "schedule", schedule.id, {"name": body.name})
        out = _out(schedule, {})
    return jsonify(out), 201, {"Location": url_for("schedules.show", schedule_id=out["id"])}


@bp.get("", responses=responses({200: ScheduleList}))
@requires(Permission.READ)
def index() -> Response:
    """List the tenant's schedules with their next run and last job."""
    return jsonify(items=schedules_out())


@bp.get("/<schedule_id>", responses=responses({200: ScheduleOut}, 404))
@requires(Permission.READ)
def show(path: SchedulePath) -> Response:
    """Read one schedule."""
    principal = current_principal()
    with services().sessions() as session:
        schedule = get_schedule(
            session, principal.tenant_id, parse_id(path.schedule_id, "schedule")
        )
        return jsonify(_out(schedule, last_job_states(session, [schedule])))


@bp.patch("/<schedule_id>", responses=responses({200: ScheduleOut}, 404, 409, *JSON_BODY))
@requires(Permission.MANAGE_SCHEDULES)
def change(path: SchedulePath, body: ScheduleChange) -> Response:
    """Change any field of a schedule; a new timing recomputes the next run."""
    return jsonify(change_schedule(parse_id(path.schedule_id, "schedule"), body))


@bp.delete("/<schedule_id>", responses=responses({204: empty("Deleted.")}, 404))
@requires(Permission.MANAGE_SCHEDULES)
def delete(path: SchedulePath) -> tuple[str, int]:
    """Delete a schedule; jobs it fired stay, with `schedule_id` cleared."""
    principal = current_principal()
    with services().work.begin() as unit:
        schedule = get_schedule(
            unit.session, principal.tenant_id, parse_id(path.schedule_id, "schedule")
        )
        detach_schedule(unit, schedule.id)
        unit.session.delete(schedule)
        audit(
            unit.session,
            principal,
            "schedule.delete",
            "schedule",
            schedule.id,
            {"name": schedule.name},
        )
    return "", 204


@bp.post("/<schedule_id>/trigger", responses=responses({202: JobOut}, 404, 409))
@requires(Permission.MANAGE_SCHEDULES)
def trigger(path: SchedulePath) -> tuple[Response, int]:
    """Run the schedule's job now, outside its timing; 202 with the job."""
    return jsonify(trigger_schedule(parse_id(path.schedule_id, "schedule"))), 202
