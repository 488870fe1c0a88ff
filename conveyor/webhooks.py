"""Webhooks: endpoints per tenant, signed deliveries enqueued as jobs when a job finishes.

A delivery is a `webhooks.deliver` job the ledger inserts in the very statement that
finishes the job (`conveyor.ledger.statements`): if the finish commits, its deliveries
exist. Deliveries are internal jobs: nobody submits them through the API.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from conveyor.ledger.states import FINISHED
from conveyor.models import Webhook
from conveyor.tenancy import owned

DELIVER_TYPE = "webhooks.deliver"
# Attempts a delivery gets (with exponential backoff, up to ten minutes apart).
DELIVERY_ATTEMPTS = 5
EVENTS = frozenset(f"job.{state.value}" for state in FINISHED)
SIGNATURE_HEADER = "Conveyor-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Return the signature header value: HMAC-SHA256 over `timestamp.body`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: int, tolerance: int = 300) -> bool:
    """Check a signature the way a receiver should (constant time, bounded age)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, timestamp, body).split("v1=")[1]
    fresh = abs(now - timestamp) <= tolerance
    # Bytes: compare_digest refuses str with non-ASCII characters, which any header may carry.
    given = fields.get("v1", "").encode("utf-8", "replace")
    return fresh and hmac.compare_digest(expected.encode(), given)


def create_webhook(session: Session, tenant_id: uuid.UUID, url: str, events: list[str]) -> Webhook:
    """Register an endpoint with a new secret (returned once by the API)."""
    webhook = Webhook(
        tenant_id=tenant_id, url=url, events=events, secret="whsec_" + secrets.token_urlsafe(32)
    )
    session.add(webhook)
    session.flush()
    return webhook


def list_webhooks(session: Session, tenant_id: uuid.UUID) -> Sequence[Webhook]:
    """Return the tenant's endpoints."""
    return session.scalars(
        select(Webhook).where(Webhook.tenant_id == tenant_id).order_by(Webhook.created_at)
    ).all()


def get_webhook(session: Session, tenant_id: uuid.UUID, webhook_id: uuid.UUID) -> Webhook:
    """Return one of the tenant's endpoints, or `NotFound`."""
    return owned(session, Webhook, webhook_id, tenant_id, "webhook")
