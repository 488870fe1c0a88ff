"""`/v1/schedules`: recurring jobs, managed as data; beat picks changes up on its next pass."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify, url_for

from api.auth import authorize
from api.publishing import publish_committed
from api.requests import parse_body, parse_id
from api.services import services
from conveyor.audit import audit
from conveyor.errors import Conflict
from conveyor.models import Schedule
from conveyor.roles import Permission
from conveyor.schedules import (
    ScheduleChange,
    ScheduleSpec,
    create_schedule,
    detach_jobs,
    fire,
    get_schedule,
    last_job_states,
    list_schedules,
    update_schedule,
)
from conveyor.views import JobOut

bp = Blueprint("schedules", __name__, url_prefix="/v1/schedules")


def _out(schedule: Schedule, states: dict[uuid.UUID, str]) -> dict[str, Any]:
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


@bp.post("")
def create() -> tuple[Response, int, dict[str, str]]:
    """Create a schedule; its job type, payload and options are validated now."""
    principal = authorize(Permission.MANAGE_SCHEDULES)
    spec = parse_body(ScheduleSpec)
    svc = services()
    with svc.sessions.begin() as session:
        schedule = create_schedule(
            session,
            svc.registry,
            principal.tenant_id,
            spec,
            default_queue=svc.settings.default_queue,
            now=datetime.now(UTC),
        )
        audit(session, principal, "schedule.create", "schedule", schedule.id, {"name": spec.name})
        body = _out(schedule, {})
    return jsonify(body), 201, {"Location": url_for("schedules.show", schedule_id=body["id"])}


@bp.get("")
def index() -> Response:
    """List the tenant's schedules with their next run and last job."""
    principal = authorize(Permission.READ)
    with services().sessions() as session:
        schedules = list_schedules(session, principal.tenant_id)
        states = last_job_states(session, schedules)
        items = [_out(schedule, states) for schedule in schedules]
    return jsonify(items=items)


@bp.get("/<schedule_id>")
def show(schedule_id: str) -> Response:
    """Return one schedule."""
    principal = authorize(Permission.READ)
    with services().sessions() as session:
        schedule = get_schedule(session, principal.tenant_id, parse_id(schedule_id, "schedule"))
        return jsonify(_out(schedule, last_job_states(session, [schedule])))


@bp.patch("/<schedule_id>")
def change(schedule_id: str) -> Response:
    """Change any field; a new timing recomputes the next run."""
    principal = authorize(Permission.MANAGE_SCHEDULES)
    body = parse_body(ScheduleChange)
    svc = services()
    with svc.sessions.begin() as session:
        schedule = get_schedule(session, principal.tenant_id, parse_id(schedule_id, "schedule"))
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
        return jsonify(_out(schedule, last_job_states(session, [schedule])))


@bp.delete("/<schedule_id>")
def delete(schedule_id: str) -> tuple[str, int]:
    """Delete a schedule; jobs it fired stay, with `schedule_id` cleared."""
    principal = authorize(Permission.MANAGE_SCHEDULES)
    with services().sessions.begin() as session:
        schedule = get_schedule(session, principal.tenant_id, parse_id(schedule_id, "schedule"))
        detach_jobs(session, schedule.id)
        session.delete(schedule)
        audit(
            session, principal, "schedule.delete", "schedule", schedule.id, {"name": schedule.name}
        )
    return "", 204


@bp.post("/<schedule_id>/trigger")
def trigger(schedule_id: str) -> tuple[Response, int]:
    """Run the schedule's job now, outside its timing; 202 with the job."""
    principal = authorize(Permission.MANAGE_SCHEDULES)
    svc = services()
    with svc.sessions.begin() as session:
        schedule = get_schedule(session, principal.tenant_id, parse_id(schedule_id, "schedule"))
        job = fire(
            session,
            svc.registry,
            schedule,
            default_queue=svc.settings.default_queue,
            now=datetime.now(UTC),
            occurrence=None,
        )
        if job is None:  # only occurrences have a unique key; a trigger has none
            raise Conflict("the schedule fired no job")
        audit(session, principal, "schedule.trigger", "schedule", schedule.id, {"job": str(job.id)})
    publish_committed(svc, [job])
    return jsonify(JobOut.of(job).model_dump(mode="json")), 202
