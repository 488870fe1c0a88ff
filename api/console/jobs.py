"""The console's job pages: the overview, the job list with bulk actions, one job."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from flask import flash, g, redirect, request, url_for
from pydantic import ValidationError
from werkzeug.datastructures import MultiDict
from werkzeug.wrappers import Response

from api.console.base import WORKERS_MAX_AGE, bp, may, needs, render
from api.console.charts import finishes_chart
from api.files import artifact_download
from api.job_views import shown
from api.queues import queue_report
from api.requests import parse_id
from api.schemas import JobListQuery
from api.services import services
from conveyor.auth.roles import Permission, check_permission, sees_internal_payloads
from conveyor.control import (
    MAX_BULK_CANCEL,
    cancel_job,
    cancel_jobs,
    retry_job,
    retry_jobs,
    retry_matching_jobs,
    unfinished_ids,
)
from conveyor.deliveries import job_deliveries
from conveyor.errors import Conflict, NotFound, ValidationFailed
from conveyor.files import get_artifact
from conveyor.ledger.activity import finishes_per_minute, recent_failures
from conveyor.ledger.reads import JobFilter, list_events, list_jobs, read_view
from conveyor.ledger.states import FINISHED, UNFINISHED, JobState
from conveyor.ledger.transitions import MAX_BULK_RETRY
from conveyor.ledger.views import job_view
from conveyor.queues import ledger_queue_stats

FILTERS = ("state", "type", "queue", "tag", "created_after", "created_before")
PAGE_SIZE = 50
# Dead states: a job in one may be retried.
RETRYABLE = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})


def _as_utc(value: str) -> str:
    """Read a form's `datetime-local` value (no offset) as UTC; keep one that has an offset."""
    if value.endswith("Z") or "+" in value[10:] or "-" in value[10:]:
        return value
    return value + "+00:00"


def parse_filters(values: MultiDict[str, str]) -> tuple[JobListQuery | None, list[str]]:
    """Validate the list's filters as the API does; return them, or None and the errors."""
    given = {name: values.get(name, "").strip() for name in (*FILTERS, "limit")}
    given = {name: value for name, value in given.items() if value}
    for name in ("created_after", "created_before"):
        if name in given:
            given[name] = _as_utc(given[name])
    try:
        return JobListQuery(**given, cursor=values.get("cursor") or None), []
    except ValidationError as exc:
        return None, [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]


def _filter_args(query: JobListQuery | None) -> dict[str, Any]:
    """Return the filters as query arguments, for links that keep them."""
    if query is None:
        return {}
    dumped = query.model_dump(mode="json", exclude_none=True, exclude={"cursor"})
    if dumped.get("limit") == PAGE_SIZE:
        del dumped["limit"]
    return {name: str(value) for name, value in dumped.items()}


@bp.get("/")
@needs(Permission.READ)
def overview() -> tuple[str, int]:
    """Show finishes and failures per minute, queues, workers, running jobs, recent failures."""
    svc = services()
    tenant_id = g.principal.tenant_id
    now = datetime.now(UTC)
    with svc.work.reading() as session:
        minutes = finishes_per_minute(session, tenant_id, now)
        failures = recent_failures(session, tenant_id, now)
        running_rows, _ = list_jobs(session, tenant_id, JobFilter(state=JobState.RUNNING), limit=10)
        running_total = sum(r for _, _, r in ledger_queue_stats(session, tenant_id).values())
    # Queue depths and workers are for those who may see queues, as in `GET /v1/queues`.
    report = queue_report(WORKERS_MAX_AGE) if may(Permission.SEE_QUEUES) else None
    return render(
        "console/overview.html",
        chart=finishes_chart(minutes),
        minutes=minutes,
        finished=sum(m.succeeded for m in minutes),
        failed=sum(m.failed for m in minutes),
        failures=failures,
        running=[shown(job_view(row)) for row in running_rows],
        running_total=running_total,
        report=report,
        now=now,
    )


@bp.get("/jobs")
@needs(Permission.READ)
def jobs() -> Response | tuple[str, int]:
    """List jobs with the API's filters, newest first, a page at a time; or find one by id."""
    lookup = request.args.get("id", "").strip()
    if lookup:
        try:
            return redirect(url_for("console.job", job_id=uuid.UUID(lookup)))
        except ValueError:
            flash(f"{lookup!r} is not a job id", "error")
    query, errors = parse_filters(request.args)
    items: list[dict[str, Any]] = []
    next_cursor = None
    if query is not None:
        with services().work.reading() as session:
            try:
                rows, next_cursor = list_jobs(
                    session,
                    g.principal.tenant_id,
                    query.filters(),
                    limit=query.limit,
                    cursor=query.cursor,
                )
            except ValidationFailed as exc:  # a malformed cursor
                errors.append(exc.detail)
                rows = []
        items = [shown(job_view(row)) for row in rows]
    filters = _filter_args(query)
    return render(
        "console/jobs.html",
        items=items,
        filters=filters,
        errors=errors,
        states=[state.value for state in JobState],
        next_url=url_for("console.jobs", **filters, cursor=next_cursor) if next_cursor else None,
        first_url=url_for("console.jobs", **filters) if query and query.cursor else None,
    )


def _selected() -> list[uuid.UUID]:
    ids = []
    for raw in request.form.getlist("ids"):
        try:
            ids.append(uuid.UUID(raw))
        except ValueError:
            continue  # not a job anyone has
    return ids


@bp.post("/jobs/bulk")
def bulk() -> Response | tuple[str, int]:
    """Retry or cancel the selected jobs or every job matching the filters, once confirmed."""
    action, _, scope = request.form.get("bulk", "").partition("-")
    if action not in ("retry", "cancel") or scope not in ("selected", "filter"):
        raise NotFound("there is no such bulk action")
    check_permission(g.principal.role, Permission.RETRY if action == "retry" else Permission.CANCEL)
    query, errors = parse_filters(request.form)
    filters = _filter_args(query)
    ids = _selected()
    if query is None or (scope == "selected" and not ids):
        flash("; ".join(errors) or "select at least one job first", "error")
        return redirect(url_for("console.jobs", **filters))
    if request.form.get("confirmed") != "yes":
        # The confirmation step: what would happen, and one more button to make it so.
        return render(
            "console/bulk_confirm.html",
            action=action,
            scope=scope,
            ids=ids,
            filters=filters,
            most=MAX_BULK_RETRY if action == "retry" else MAX_BULK_CANCEL,
        )
    svc = services()
    now = datetime.now(UTC)
    principal = g.principal
    try:
        with svc.work.begin() as unit:
            if scope == "selected":
                run = retry_jobs if action == "retry" else cancel_jobs
                outcome = run(unit, svc.registry, principal, ids, now)
                done, skipped = len(outcome.done), len(outcome.skipped)
            elif action == "retry":
                views = retry_matching_jobs(
                    unit,
                    svc.registry,
                    principal,
                    query.filters(),
                    now,
                    limit=MAX_BULK_RETRY,
                    described={**filters, "from": "console"},
                )
                done, skipped = len(views), 0
            else:
                matching = unfinished_ids(unit, principal.tenant_id, query.filters())
                outcome = cancel_jobs(unit, svc.registry, principal, matching, now)
                done, skipped = len(outcome.done), len(outcome.skipped)
    except Conflict as exc:
        flash(exc.detail, "error")
        return redirect(url_for("console.jobs", **filters))
    verb = "retried" if action == "retry" else "cancelled (or asked to stop)"
    note = f"; {skipped} could not be" if skipped else ""
    flash(f"{done} job{'s' if done != 1 else ''} {verb}{note}.", "ok")
    return redirect(url_for("console.jobs", **filters))


@bp.get("/jobs/<job_id>")
@needs(Permission.READ)
def job(job_id: str) -> tuple[str, int]:
    """Show a job: state, payload, result or error, progress, timeline, deliveries, file."""
    svc = services()
    principal = g.principal
    key = parse_id(job_id, "job")
    with svc.work.reading() as session:
        view = shown(read_view(svc.live, session, key, principal.tenant_id))
        events = list_events(session, key, principal.tenant_id)
        deliveries = job_deliveries(
            session, principal.tenant_id, key, show_url=sees_internal_payloads(principal.role)
        )
        try:
            artifact = get_artifact(session, key)
        except NotFound:
            artifact = None
        state = JobState(view["state"])
        return render(
            "console/job.html",
            job=view,
            events=events,
            deliveries=deliveries,
            artifact=artifact,
            can_retry=state in RETRYABLE and may(Permission.RETRY),
            can_cancel=state in UNFINISHED and may(Permission.CANCEL),
            finished=state in FINISHED,
            final_states=" ".join(sorted(FINISHED)),
        )


@bp.post("/jobs/<job_id>/retry")
@needs(Permission.RETRY)
def retry(job_id: str) -> Response:
    """Run a dead job again (audited), then show it."""
    return _act(job_id, "retry")


@bp.post("/jobs/<job_id>/cancel")
@needs(Permission.CANCEL)
def cancel(job_id: str) -> Response:
    """Cancel a waiting job or ask a running one to stop (audited), then show it."""
    return _act(job_id, "cancel")


def _act(job_id: str, action: str) -> Response:
    svc = services()
    key = parse_id(job_id, "job")
    try:
        with svc.work.begin() as unit:
            if action == "retry":
                retry_job(unit, svc.registry, g.principal, key, datetime.now(UTC))
                flash("Retried: the job is queued again.", "ok")
            else:
                _, outcome = cancel_job(unit, svc.registry, g.principal, key, datetime.now(UTC))
                flash(
                    "Cancelled." if outcome == "cancelled" else "Asked the running job to stop.",
                    "ok",
                )
    except Conflict as exc:
        flash(exc.detail, "error")
    return redirect(url_for("console.job", job_id=key))


@bp.get("/jobs/<job_id>/artifact")
@needs(Permission.READ)
def artifact(job_id: str) -> Response:
    """Download the file the job produced (as `GET /v1/jobs/{id}/artifact`)."""
    return artifact_download(parse_id(job_id, "job"))
