"""`/v1/workflows`: submit a graph of jobs, follow it, list them, cancel one."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from flask import Response, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field

from api.admission import admitting
from api.auth import current_principal, requires
from api.jobs import idempotency_key
from api.openapi import (
    JSON_BODY,
    LOCATION,
    ObjectId,
    QueryModel,
    described,
    responses,
    secured_blueprint,
)
from api.requests import parse_id
from api.services import services
from conveyor.audit import audit
from conveyor.auth.roles import Permission
from conveyor.control import actor
from conveyor.ledger.idempotency import claim_idempotency_key
from conveyor.ledger.reads import MAX_PAGE
from conveyor.ledger.views import JobOut
from conveyor.ledger.workflows import (
    WorkflowRequest,
    cancel_workflow,
    create_workflow,
    list_workflows,
    workflow_view,
)

logger = logging.getLogger(__name__)
bp = secured_blueprint("workflows", __name__, "workflows", "/v1/workflows")
# Idempotency keys of workflows live beside those of jobs, in a namespace of their own.
KEY_PREFIX = "workflow:"


class WorkflowPath(BaseModel):
    """A workflow's id in the path."""

    workflow_id: ObjectId


class WorkflowSummary(BaseModel):
    """A workflow without its jobs (as lists show it)."""

    id: uuid.UUID
    name: str
    state: Literal["running", "succeeded", "failed", "cancelled"]
    total: int
    unfinished: int
    created_at: datetime
    finished_at: datetime | None
    cancel_requested_at: datetime | None


class WorkflowJobOut(JobOut):
    """One job of a workflow: its ref and the refs it depends on."""

    ref: str | None
    depends_on: list[str]
    on_dependency_failure: Literal["cancel", "run"]


class WorkflowOut(WorkflowSummary):
    """A workflow and every job in it."""

    jobs: list[WorkflowJobOut]


class WorkflowPage(BaseModel):
    """A page of workflows, newest first."""

    items: list[WorkflowSummary]
    next_cursor: str | None
    links: dict[str, str]


class WorkflowListQuery(QueryModel):
    """`GET /v1/workflows` query parameters."""

    model_config = ConfigDict(extra="forbid")
    state: Literal["running", "succeeded", "failed", "cancelled"] | None = None
    name: str | None = Field(default=None, max_length=200)
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, max_length=200)


@bp.post(
    "",
    responses=responses(
        {
            202: described(
                WorkflowOut, "Accepted: every job stored; those free to run are queued.", LOCATION
            ),
            200: described(WorkflowOut, "A repeated `Idempotency-Key`: that workflow.", LOCATION),
        },
        409,
        *JSON_BODY,
    ),
)
@requires(Permission.SUBMIT)
def create(body: WorkflowRequest) -> tuple[Response, int, dict[str, str]]:
    """Submit a workflow: all its jobs and their dependencies, or nothing (422 names why)."""
    principal = current_principal()
    key = idempotency_key()
    svc = services()
    now = datetime.now(UTC)
    workflow_id = uuid.uuid4()
    with svc.work.begin() as unit:
        original = None
        if key is not None:
            original = claim_idempotency_key(
                unit,
                principal.tenant_id,
                KEY_PREFIX + key,
                body.fingerprint(),
                workflow_id,
                now=now,
                retention=timedelta(hours=svc.settings.idempotency_retention_hours),
            )
        if original is None:
            create_workflow(
                unit,
                svc.registry,
                body,
                tenant_id=principal.tenant_id,
                default_queue=svc.settings.default_queue,
                now=now,
                workflow_id=workflow_id,
                gate=svc.gate,
                admit=admitting(unit, principal.tenant_id),
            )
        view = workflow_view(unit.session, original or workflow_id, principal.tenant_id)
    location = {"Location": url_for("workflows.show", workflow_id=view["id"])}
    if original is not None:
        return jsonify(view), 200, location
    logger.info("workflow %s submitted with %d jobs", view["id"], len(view["jobs"]))
    return jsonify(view), 202, location


@bp.get("", responses=responses({200: WorkflowPage}, 422))
@requires(Permission.READ)
def index(query: WorkflowListQuery) -> Response:
    """List workflows, newest first, filtered by state and name, a page at a time."""
    principal = current_principal()
    with services().work.reading() as session:
        items, next_cursor = list_workflows(
            session,
            principal.tenant_id,
            state=query.state,
            name=query.name,
            limit=query.limit,
            cursor=query.cursor,
        )
    links = {}
    if next_cursor is not None:
        args: dict[str, Any] = {**request.args.to_dict(), "cursor": next_cursor}
        links["next"] = url_for("workflows.index", **args)
    return jsonify(items=items, next_cursor=next_cursor, links=links)


@bp.get("/<workflow_id>", responses=responses({200: WorkflowOut}, 404))
@requires(Permission.READ)
def show(path: WorkflowPath) -> Response:
    """Read a workflow: its state, and every job with its state and dependencies."""
    principal = current_principal()
    with services().work.reading() as session:
        view = workflow_view(session, parse_id(path.workflow_id, "workflow"), principal.tenant_id)
    return jsonify(view)


@bp.post("/<workflow_id>/cancel", responses=responses({202: WorkflowOut}, 404, 409))
@requires(Permission.CANCEL)
def cancel(path: WorkflowPath) -> tuple[Response, int]:
    """Cancel every unfinished job of a workflow (running ones are asked to stop)."""
    return jsonify(cancel_workflow_of_caller(parse_id(path.workflow_id, "workflow"))), 202


def cancel_workflow_of_caller(workflow_id: uuid.UUID) -> dict[str, Any]:
    """Cancel the caller's workflow, audited, and return its view (the API's and the console's)."""
    principal = current_principal()
    with services().work.begin() as unit:
        cancel_workflow(unit, principal.tenant_id, workflow_id, datetime.now(UTC), actor(principal))
        audit(unit.session, principal, "workflow.cancel", "workflow", workflow_id, {})
        return workflow_view(unit.session, workflow_id, principal.tenant_id)
