"""`/v1/webhooks` (endpoints for job events) and `GET /v1/jobs/{id}/deliveries` (their log)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from flask import Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.auth import current_principal, requires
from api.openapi import JSON_BODY, ObjectId, empty, responses, secured_blueprint
from api.requests import parse_id
from api.schemas import JobPath
from api.services import services
from conveyor.audit import audit
from conveyor.auth.roles import Permission, sees_internal_payloads
from conveyor.deliveries import job_deliveries
from conveyor.models import Webhook
from conveyor.webhooks import (
    EVENTS,
    create_webhook,
    get_webhook,
    list_webhooks,
)

bp = secured_blueprint("webhooks", __name__, "webhooks")


class NewWebhook(BaseModel):
    """`POST /v1/webhooks`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "url": "https://hooks.example.com/conveyor",
                "events": ["job.succeeded", "job.failed"],
            }
        },
    )
    url: str = Field(max_length=2048, pattern=r"^https?://\S+$")
    events: list[str] = Field(min_length=1, max_length=len(EVENTS))

    @field_validator("events")
    @classmethod
    def _known(cls, events: list[str]) -> list[str]:
        unknown = sorted(set(events) - EVENTS)
        if unknown:
            raise ValueError(f"unknown events {unknown}; choose from {sorted(EVENTS)}")
        return sorted(set(events))


class WebhookOut(BaseModel):
    """An endpoint that receives job events."""

    id: uuid.UUID
    url: str
    events: list[str]
    enabled: bool
    created_at: datetime


class CreatedWebhook(WebhookOut):
    """A new endpoint, with the secret that signs its deliveries shown this once."""

    secret: str


class WebhookList(BaseModel):
    """`GET /v1/webhooks`."""

    items: list[WebhookOut]


class WebhookPath(BaseModel):
    """A webhook's id in the path."""

    webhook_id: ObjectId


class DeliveryOut(BaseModel):
    """One attempt to deliver one of a job's events."""

    delivery_id: uuid.UUID
    url: str | None = Field(description="Where it went; null below the operator role.")
    event: str
    attempt: int
    outcome: str
    status_code: int | None
    seconds: float | None
    error: str | None


class DeliveryList(BaseModel):
    """`GET /v1/jobs/{id}/deliveries`."""

    items: list[DeliveryOut]


def _out(webhook: Webhook) -> dict[str, Any]:
    return {
        "id": str(webhook.id),
        "url": webhook.url,
        "events": webhook.events,
        "enabled": webhook.enabled,
        "created_at": webhook.created_at.isoformat(),
    }


def add_endpoint(body: NewWebhook) -> dict[str, Any]:
    """Register the caller's endpoint, audited; the answer holds its secret, shown this once."""
    principal = current_principal()
    with services().sessions.begin() as session:
        webhook = create_webhook(session, principal.tenant_id, body.url, body.events)
        audit(session, principal, "webhook.create", "webhook", webhook.id, {"url": body.url})
        return {**_out(webhook), "secret": webhook.secret}


def remove_endpoint(webhook_id: uuid.UUID) -> None:
    """Remove one of the caller's endpoints, audited (`NotFound` for another tenant's)."""
    principal = current_principal()
    with services().sessions.begin() as session:
        webhook = get_webhook(session, principal.tenant_id, webhook_id)
        session.delete(webhook)
        audit(session, principal, "webhook.delete", "webhook", webhook.id)


def endpoints() -> list[dict[str, Any]]:
    """Return the caller's endpoints (without secrets)."""
    with services().sessions() as session:
        return [_out(w) for w in list_webhooks(session, current_principal().tenant_id)]


@bp.post("/v1/webhooks", responses=responses({201: CreatedWebhook}, *JSON_BODY))
@requires(Permission.MANAGE_WEBHOOKS)
def create(body: NewWebhook) -> tuple[Response, int]:
    """Register an endpoint; the signing secret is in this answer and never again."""
    return jsonify(add_endpoint(body)), 201


@bp.get("/v1/webhooks", responses=responses({200: WebhookList}))
@requires(Permission.MANAGE_WEBHOOKS)
def index() -> Response:
    """List the tenant's endpoints (without secrets)."""
    return jsonify(items=endpoints())


@bp.delete("/v1/webhooks/<webhook_id>", responses=responses({204: empty("Removed.")}, 404))
@requires(Permission.MANAGE_WEBHOOKS)
def delete(path: WebhookPath) -> tuple[str, int]:
    """Remove an endpoint; deliveries still queued for it are skipped."""
    remove_endpoint(parse_id(path.webhook_id, "webhook"))
    return "", 204


@bp.get("/v1/jobs/<job_id>/deliveries", responses=responses({200: DeliveryList}, 404))
@requires(Permission.READ)
def deliveries(path: JobPath) -> Response:
    """List every delivery attempt of a job's events: where, outcome, status, time taken."""
    principal = current_principal()
    key = parse_id(path.job_id, "job")
    # Webhook URLs are for those who manage webhooks, as in the delivery jobs' own views.
    show_url = sees_internal_payloads(principal.role)
    with services().sessions() as session:
        items = job_deliveries(session, principal.tenant_id, key, show_url=show_url)
    return jsonify(items=items)
