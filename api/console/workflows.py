"""The console's workflow pages: the list, and one workflow drawn as a graph of its jobs.

The list and the view are `conveyor.ledger.workflows`' own reads, the filters the API's
`WorkflowListQuery`, and the cancel is `api.workflows.cancel_workflow_of_caller`, so the
rules, the tenant walls and the audit entry are the API's.
"""

from __future__ import annotations

from typing import Any

from flask import flash, g, redirect, request, url_for
from pydantic import ValidationError
from werkzeug.wrappers import Response

from api.console.base import bp, may, needs, render
from api.console.graphs import MAX_DRAWN, workflow_graph
from api.requests import parse_id
from api.services import services
from api.workflows import WorkflowListQuery, cancel_workflow_of_caller
from conveyor.auth.roles import Permission
from conveyor.errors import Conflict, ValidationFailed
from conveyor.ledger.workflows import list_workflows, workflow_view

PAGE_SIZE = 50
STATES = ("running", "succeeded", "failed", "cancelled")


@bp.get("/workflows")
@needs(Permission.READ)
def workflows() -> tuple[str, int]:
    """List workflows, newest first, by state and name, a page at a time."""
    fields = ("state", "name", "cursor", "limit")
    given = {name: request.args.get(name, "").strip() for name in fields}
    given = {name: value for name, value in given.items() if value}
    errors: list[str] = []
    items: list[dict[str, Any]] = []
    next_cursor = None
    filters: dict[str, Any] = {}
    try:
        query = WorkflowListQuery.model_validate({"limit": PAGE_SIZE, **given})
    except ValidationError as exc:
        errors = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    else:
        filters = {k: v for k, v in (("state", query.state), ("name", query.name)) if v}
        if query.limit != PAGE_SIZE:
            filters["limit"] = str(query.limit)
        with services().work.reading() as session:
            try:
                items, next_cursor = list_workflows(
                    session,
                    g.principal.tenant_id,
                    state=query.state,
                    name=query.name,
                    limit=query.limit,
                    cursor=query.cursor,
                )
            except ValidationFailed as exc:  # a malformed cursor
                errors.append(exc.detail)
    return render(
        "console/workflows.html",
        items=items,
        filters=filters,
        errors=errors,
        states=STATES,
        next_url=(
            url_for("console.workflows", **filters, cursor=next_cursor) if next_cursor else None
        ),
        first_url=url_for("console.workflows", **filters) if "cursor" in given else None,
    )


@bp.get("/workflows/<workflow_id>")
@needs(Permission.READ)
def workflow(workflow_id: str) -> tuple[str, int]:
    """Show a workflow: its state, and its jobs as a graph by dependency (a table if large)."""
    key = parse_id(workflow_id, "workflow")
    with services().work.reading() as session:
        view = workflow_view(session, key, g.principal.tenant_id)
    graph = workflow_graph(view["jobs"], lambda job_id: url_for("console.job", job_id=job_id))
    return render(
        "console/workflow.html",
        workflow=view,
        graph=graph,
        max_drawn=MAX_DRAWN,
        can_cancel=view["state"] == "running" and may(Permission.CANCEL),
        counts=_counts(view["jobs"]),
    )


def _counts(jobs: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["state"]] = counts.get(job["state"], 0) + 1
    return dict(sorted(counts.items()))


@bp.post("/workflows/<workflow_id>/cancel")
@needs(Permission.CANCEL)
def cancel_workflow(workflow_id: str) -> Response:
    """Cancel every unfinished job of the workflow (audited), then show it."""
    key = parse_id(workflow_id, "workflow")
    try:
        cancel_workflow_of_caller(key)
        flash("Workflow cancelled: waiting jobs cancelled, running ones asked to stop.", "ok")
    except Conflict as exc:
        flash(exc.detail, "error")
    return redirect(url_for("console.workflow", workflow_id=key))
