"""`webhooks.deliver`: POST a finished job's public view to an endpoint, signed."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import select

from conveyor.errors import JobFailed, NotFound, PermanentError
from conveyor.ledger.reads import job_row
from conveyor.ledger.views import job_view
from conveyor.ledger.workflows import workflow_summary
from conveyor.models import Webhook
from conveyor.outbound import request
from conveyor.registry import JobContext, RetryPolicy, job_type
from conveyor.settings import Settings
from conveyor.webhooks import DELIVER_TYPE, DELIVERY_ATTEMPTS, EVENTS, SIGNATURE_HEADER, sign


class Delivery(BaseModel):
    """Which job's event goes where."""

    model_config = ConfigDict(extra="forbid")
    # A job's event names the job; a workflow's, the workflow.
    job_id: uuid.UUID | None = None
    workflow_id: uuid.UUID | None = None
    event: str
    url: str
    webhook_id: uuid.UUID | None = None

    @field_validator("event")
    @classmethod
    def _known_event(cls, event: str) -> str:
        if event not in EVENTS:
            raise ValueError(f"unknown event; choose from {sorted(EVENTS)}")
        return event


def _required(job_id: uuid.UUID | None) -> uuid.UUID:
    if job_id is None:
        raise PermanentError("the delivery names neither a job nor a workflow")
    return job_id


class DeliveryFailed(JobFailed):
    """Raised when the receiver does not answer 2xx; retried with backoff."""

    def __init__(self, status_code: int) -> None:
        # No URL in the message: every role reads a delivery's error, only operators its URL.
        super().__init__(f"the receiver answered HTTP {status_code}")
        # Kept in the attempt's event, for the delivery log.
        self.event_detail = {"status_code": status_code}


@job_type(
    DELIVER_TYPE,
    payload=Delivery,
    retry=RetryPolicy(max_attempts=DELIVERY_ATTEMPTS, backoff_base=1.0, backoff_cap=600.0),
    internal=True,
)
def deliver(ctx: JobContext, payload: Delivery) -> dict[str, object]:
    """Send the event; a timeout or a non-2xx answer fails the attempt, which retries.

    The job and the webhook are read within the delivery's own tenant: another tenant's
    are as absent as deleted ones (skipped). The URL must be the one the tenant gave, the
    webhook's or the job's `callback_url`; any other is refused for good, before sending.
    """
    settings = ctx.settings or Settings()
    try:
        if payload.workflow_id is not None:
            job: Any = None
            subject = {
                "workflow": workflow_summary(ctx.session, payload.workflow_id, ctx.tenant_id)
            }
        else:
            job = job_row(ctx.session, _required(payload.job_id), ctx.tenant_id)
            subject = {"job": job_view(job)}
    except NotFound:
        return {"skipped": "the job or workflow no longer exists"}
    webhook = None
    if payload.webhook_id is not None:
        webhook = ctx.session.scalar(
            select(Webhook).where(
                Webhook.id == payload.webhook_id, Webhook.tenant_id == ctx.tenant_id
            )
        )
        if webhook is None or not webhook.enabled:
            return {"skipped": "the webhook was removed or disabled"}
    callback = job["callback_url"] if job is not None else None
    if payload.url != (webhook.url if webhook is not None else callback):
        raise PermanentError("the delivery's URL is not its webhook's or the job's callback URL")
    body = json.dumps(
        {"event": payload.event, **subject},
        separators=(",", ":"),
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "Conveyor-Event": payload.event,
        "Conveyor-Delivery": str(ctx.job_id),
    }
    if webhook is not None:
        headers[SIGNATURE_HEADER] = sign(webhook.secret, int(time.time()), body)
    answer = request(
        "POST",
        payload.url,
        allow_hosts=frozenset(settings.outbound_allow_hosts),
        headers=headers,
        body=body,
        timeout=10.0,
        max_bytes=64 * 1024,
    )
    if not 200 <= answer.status < 300:
        raise DeliveryFailed(answer.status)
    return {"status": answer.status, "seconds": round(answer.seconds, 3)}
