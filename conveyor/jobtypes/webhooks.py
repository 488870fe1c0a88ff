"""`webhooks.deliver`: POST a finished job's public view to an endpoint, signed."""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel, ConfigDict

from conveyor.errors import JobFailed, NotFound
from conveyor.ledger.reads import job_row
from conveyor.ledger.views import job_view
from conveyor.models import Webhook
from conveyor.outbound import request
from conveyor.registry import JobContext, RetryPolicy, job_type
from conveyor.settings import Settings
from conveyor.webhooks import DELIVER_TYPE, DELIVERY_ATTEMPTS, SIGNATURE_HEADER, sign


class Delivery(BaseModel):
    """Which job's event goes where."""

    model_config = ConfigDict(extra="forbid")
    job_id: uuid.UUID
    event: str
    url: str
    webhook_id: uuid.UUID | None = None


class DeliveryFailed(JobFailed):
    """Raised when the receiver does not answer 2xx; retried with backoff."""

    def __init__(self, status_code: int, url: str) -> None:
        super().__init__(f"HTTP {status_code} from {url}")
        # Kept in the attempt's event, for the delivery log.
        self.event_detail = {"status_code": status_code}


@job_type(
    DELIVER_TYPE,
    payload=Delivery,
    retry=RetryPolicy(max_attempts=DELIVERY_ATTEMPTS, backoff_base=1.0, backoff_cap=600.0),
)
def deliver(ctx: JobContext, payload: Delivery) -> dict[str, object]:
    """Send the event; a timeout or a non-2xx answer fails the attempt, which retries."""
    settings = ctx.settings or Settings()
    try:
        job = job_row(ctx.session, payload.job_id, ctx.tenant_id)
    except NotFound:
        return {"skipped": "the job no longer exists"}
    body = json.dumps(
        {"event": payload.event, "job": job_view(job)},
        separators=(",", ":"),
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "Conveyor-Event": payload.event,
        "Conveyor-Delivery": str(ctx.job_id),
    }
    if payload.webhook_id is not None:
        webhook = ctx.session.get(Webhook, payload.webhook_id)
        if webhook is None or not webhook.enabled:
            return {"skipped": "the webhook was removed or disabled"}
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
        raise DeliveryFailed(answer.status, payload.url)
    return {"status": answer.status, "seconds": round(answer.seconds, 3)}
