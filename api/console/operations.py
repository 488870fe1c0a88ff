"""The console's operations pages: queues, limits, schedules, webhooks, API keys, audit.

Each action calls the function its API endpoint calls (api/flow.py, api/schedules.py,
api/webhooks.py, api/keys.py), so the rules, the tenant walls and the audit entries are
the API's own.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from flask import flash, g, redirect, request, url_for
from pydantic import ValidationError
from werkzeug.wrappers import Response

from api.audit import audit_items
from api.console.base import WORKERS_MAX_AGE, bp, needs, render
from api.flow import (
    LimitBounds,
    LimitPath,
    pause_queue_of_caller,
    put_limit,
    remove_limit,
    resume_queue_of_caller,
)
from api.identity_schemas import NewApiKey
from api.keys import issue_key, live_keys, revoke_key
from api.queues import queue_report
from api.requests import parse_id
from api.schedules import change_schedule, schedules_out, trigger_schedule
from api.services import services
from api.webhooks import NewWebhook, add_endpoint, endpoints, remove_endpoint
from conveyor.auth.roles import Permission, Role
from conveyor.errors import ConveyorError, NotFound
from conveyor.ledger.flow import list_limits
from conveyor.schedules import ScheduleChange, get_schedule, next_occurrence
from conveyor.webhooks import EVENTS

# How many coming runs the schedules page shows per schedule.
NEXT_RUNS = 3
AUDIT_PAGE = 100


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'form'}: {e['msg']}" for e in exc.errors())


def _blank_none(value: str | None) -> str | None:
    return value.strip() if value and value.strip() else None


@bp.get("/queues")
@needs(Permission.SEE_QUEUES)
def queues() -> tuple[str, int]:
    """Show each queue's depth, oldest wait, running jobs and pause; the live workers."""
    return render("console/queues.html", report=queue_report(WORKERS_MAX_AGE))


@bp.post("/queues/<queue>/pause")
@needs(Permission.PAUSE_QUEUES)
def pause_queue(queue: str) -> Response:
    """Hold the tenant's jobs in a queue (audited)."""
    pause_queue_of_caller(queue[:100])
    flash(f"Queue {queue} paused: its jobs wait until resumed.", "ok")
    return redirect(url_for("console.queues"))


@bp.post("/queues/<queue>/resume")
@needs(Permission.PAUSE_QUEUES)
def resume_queue(queue: str) -> Response:
    """Let the tenant's jobs in a queue start again (audited)."""
    still = resume_queue_of_caller(queue[:100])
    note = " (a deployment-wide pause still holds it)" if still else ""
    flash(f"Queue {queue} resumed{note}.", "ok")
    return redirect(url_for("console.queues"))


@bp.get("/limits")
@needs(Permission.READ)
def limits() -> tuple[str, int]:
    """List the tenant's limits with the jobs each holds; a form to set one."""
    with services().work.reading() as session:
        states = list_limits(session, g.principal.tenant_id)
    return render("console/limits.html", limits=states)


@bp.post("/limits")
@needs(Permission.MANAGE_LIMITS)
def set_limit() -> Response:
    """Create or change a limit (audited)."""
    form = request.form
    try:
        key = LimitPath(key=form.get("key", "").strip()).key
        bounds = LimitBounds(
            max_running=_blank_none(form.get("max_running")),
            per_second=_blank_none(form.get("per_second")),
        )
    except ValidationError as exc:
        flash(_problems(exc), "error")
        return redirect(url_for("console.limits"))
    put_limit(key, bounds)
    flash(f"Limit {key} set.", "ok")
    return redirect(url_for("console.limits"))


@bp.post("/limits/<key>/delete")
@needs(Permission.MANAGE_LIMITS)
def delete_limit(key: str) -> Response:
    """Remove a limit (audited): its jobs run unlimited."""
    try:
        remove_limit(LimitPath(key=key).key)
    except ValidationError as exc:
        raise NotFound(f"there is no limit {key}") from exc
    flash(f"Limit {key} removed.", "ok")
    return redirect(url_for("console.limits"))


@bp.get("/schedules")
@needs(Permission.READ)
def schedules() -> tuple[str, int]:
    """List schedules with their next runs and last job; enable, disable, trigger."""
    items = schedules_out()
    now = datetime.now(UTC)
    upcoming: dict[str, list[datetime]] = {}
    with services().sessions() as session:
        for item in items:
            schedule = get_schedule(session, g.principal.tenant_id, uuid.UUID(item["id"]))
            runs = [schedule.next_run_at]
            while schedule.enabled and len(runs) < NEXT_RUNS:
                runs.append(next_occurrence(schedule, runs[-1]))
            upcoming[item["id"]] = runs if schedule.enabled else []
    return render("console/schedules.html", schedules=items, upcoming=upcoming, now=now)


@bp.post("/schedules/<schedule_id>/<action>")
@needs(Permission.MANAGE_SCHEDULES)
def schedule_action(schedule_id: str, action: str) -> Response:
    """Enable, disable or trigger a schedule now (audited)."""
    key = parse_id(schedule_id, "schedule")
    if action == "trigger":
        job = trigger_schedule(key)
        flash("Triggered: the job is on its way.", "ok")
        return redirect(url_for("console.job", job_id=job["id"]))
    if action not in ("enable", "disable"):
        raise NotFound(f"there is no schedule action {action}")
    change_schedule(key, ScheduleChange(enabled=action == "enable"))
    flash(f"Schedule {action}d.", "ok")
    return redirect(url_for("console.schedules"))


@bp.get("/webhooks")
@needs(Permission.MANAGE_WEBHOOKS)
def webhooks() -> tuple[str, int]:
    """List the tenant's webhook endpoints; a form to add one."""
    return render("console/webhooks.html", webhooks=endpoints(), events=sorted(EVENTS))


@bp.post("/webhooks")
@needs(Permission.MANAGE_WEBHOOKS)
def add_webhook() -> Response | tuple[str, int]:
    """Register an endpoint (audited); its signing secret is shown this once."""
    try:
        body = NewWebhook(url=request.form.get("url", ""), events=request.form.getlist("events"))
    except ValidationError as exc:
        flash(_problems(exc), "error")
        return redirect(url_for("console.webhooks"))
    created = add_endpoint(body)
    return render(
        "console/webhooks.html",
        webhooks=endpoints(),
        events=sorted(EVENTS),
        created=created,
    )


@bp.post("/webhooks/<webhook_id>/delete")
@needs(Permission.MANAGE_WEBHOOKS)
def delete_webhook(webhook_id: str) -> Response:
    """Remove an endpoint (audited)."""
    remove_endpoint(parse_id(webhook_id, "webhook"))
    flash("Webhook removed.", "ok")
    return redirect(url_for("console.webhooks"))


@bp.get("/keys")
@needs(Permission.MANAGE_KEYS)
def keys() -> tuple[str, int]:
    """List the tenant's live API keys; a form to issue one."""
    return render("console/keys.html", keys=live_keys(), roles=_grantable())


def _grantable() -> list[str]:
    return [role.value for role in Role if role.rank <= Role(g.principal.role).rank]


@bp.post("/keys")
@needs(Permission.MANAGE_KEYS)
def create_key() -> Response | tuple[str, int]:
    """Issue a key (audited); its secret is shown on this page once and never again."""
    expires = _blank_none(request.form.get("expires_at"))
    fields: dict[str, Any] = {
        "name": request.form.get("name", "").strip(),
        "role": request.form.get("role", ""),
        "expires_at": expires + "T00:00:00+00:00" if expires and len(expires) == 10 else expires,
    }
    try:
        body = NewApiKey(**fields)
    except ValidationError as exc:
        flash(_problems(exc), "error")
        return redirect(url_for("console.keys"))
    try:
        created = issue_key(body)
    except ConveyorError as exc:
        flash(exc.detail, "error")
        return redirect(url_for("console.keys"))
    return render("console/keys.html", keys=live_keys(), roles=_grantable(), created=created)


@bp.post("/keys/<key_id>/revoke")
@needs(Permission.MANAGE_KEYS)
def revoke(key_id: str) -> Response:
    """Revoke a key and every key it created (audited)."""
    revoke_key(parse_id(key_id, "API key"))
    flash("Key revoked, with every key it created.", "ok")
    return redirect(url_for("console.keys"))


@bp.get("/audit")
@needs(Permission.SEE_AUDIT)
def audit() -> tuple[str, int]:
    """Show who did what and when, newest first, a page at a time."""
    try:
        before = int(request.args["before_id"]) if request.args.get("before_id") else None
    except ValueError:
        before = None
    items = audit_items(AUDIT_PAGE, before)
    older = items[-1]["id"] if len(items) == AUDIT_PAGE else None
    return render("console/audit.html", entries=items, older=older)
