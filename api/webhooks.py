"""`/v1/webhooks` (endpoints for job events) and `GET /v1/jobs/{id}/deliveries` (their log)."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from api.auth import authorize
from api.requests import parse_body, parse_id
from api.services import services
from conveyor.audit import audit
from conveyor.models import Job, JobEvent, Webhook
from conveyor.queries import get_job
from conveyor.roles import Permission
from conveyor.webhooks import DELIVER_TYPE, EVENTS, create_webhook, get_webhook, list_webhooks

bp = Blueprint("webhooks", __name__)


class NewWebhook(BaseModel):
    """`POST /v1/webhooks`."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2048, pattern=r"^https?://\S+$")
    events: list[str] = Field(min_length=1, max_length=len(EVENTS))

    @field_validator("events")
    @classmethod
    def _known(cls, events: list[str]) -> list[str]:
        unknown = sorted(set(events) - EVENTS)
        if unknown:
            raise ValueError(f"unknown events {unknown}; choose from {sorted(EVENTS)}")
        return sorted(set(events))


def _out(webhook: Webhook) -> dict[str, Any]:
    return {
        "id": str(webhook.id),
        "url": webhook.url,
        "events": webhook.events,
        "enabled": webhook.enabled,
        "created_at": webhook.created_at.isoformat(),
    }


@bp.post("/v1/webhooks")
def create() -> tuple[Response, int]:
    """Register an endpoint; the signing secret is in this answer and never again."""
    principal = authorize(Permission.MANAGE_WEBHOOKS)
    body = parse_body(NewWebhook)
    with services().sessions.begin() as session:
        webhook = create_webhook(session, principal.tenant_id, body.url, body.events)
        audit(session, principal, "webhook.create", "webhook", webhook.id, {"url": body.url})
        out = {**_out(webhook), "secret": webhook.secret}
    return jsonify(out), 201


@bp.get("/v1/webhooks")
def index() -> Response:
    """List the tenant's endpoints (without secrets)."""
    principal = authorize(Permission.MANAGE_WEBHOOKS)
    with services().sessions() as session:
        return jsonify(items=[_out(w) for w in list_webhooks(session, principal.tenant_id)])


@bp.delete("/v1/webhooks/<webhook_id>")
def delete(webhook_id: str) -> tuple[str, int]:
    """Remove an endpoint; deliveries still queued for it are skipped."""
    principal = authorize(Permission.MANAGE_WEBHOOKS)
    with services().sessions.begin() as session:
        webhook = get_webhook(session, principal.tenant_id, parse_id(webhook_id, "webhook"))
        session.delete(webhook)
        audit(session, principal, "webhook.delete", "webhook", webhook.id)
    return "", 204


@bp.get("/v1/jobs/<job_id>/deliveries")
def deliveries(job_id: str) -> Response:
    """Every delivery attempt of the job's events: where, outcome, HTTP status, time taken."""
    principal = authorize(Permission.READ)
    key = parse_id(job_id, "job")
    with services().sessions() as session:
        get_job(session, key, principal.tenant_id)
        rows = session.execute(
            select(Job.id, Job.payload, JobEvent.to_state, JobEvent.attempt, JobEvent.detail)
            .join(JobEvent, JobEvent.job_id == Job.id)
            .where(
                Job.tenant_id == principal.tenant_id,
                Job.type == DELIVER_TYPE,
                Job.payload["job_id"].astext == str(key),
                JobEvent.from_state == "running",
            )
            .order_by(JobEvent.id)
        ).all()
        found = session.execute(select(Job.id, Job.result).where(Job.id.in_({r.id for r in rows})))
        results: dict[uuid.UUID, Any] = {delivery: result for delivery, result in found}
    items = []
    for delivery_id, payload, outcome, attempt, detail in rows:
        detail = detail or {}
        result = results.get(delivery_id) or {}
        items.append(
            {
                "delivery_id": str(delivery_id),
                "url": payload["url"],
                "event": payload["event"],
                "attempt": attempt,
                "outcome": outcome,
                "status_code": detail.get("status_code", result.get("status")),
                "seconds": detail.get("seconds"),
                "error": detail.get("error_message"),
            }
        )
    return jsonify(items=items)
