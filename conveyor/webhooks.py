"""Webhooks: endpoints per tenant, signed deliveries enqueued as jobs when a job finishes.

A delivery is a `webhooks.deliver` job inserted in the same transaction as the finishing
transition (a transactional outbox): if the transition commits, its deliveries exist.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from conveyor.errors import NotFound
from conveyor.models import Job, Webhook
from conveyor.registry import registry
from conveyor.states import JobState
from conveyor.submit import JobRequest, Submitted, submit_jobs

DELIVER_TYPE = "webhooks.deliver"
EVENTS = frozenset(f"job.{s.value}" for s in JobState if s.is_terminal)
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
    return fresh and hmac.compare_digest(expected, fields.get("v1", ""))


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
    webhook = session.scalar(
        select(Webhook).where(Webhook.id == webhook_id, Webhook.tenant_id == tenant_id)
    )
    if webhook is None:
        raise NotFound(f"there is no webhook {webhook_id}")
    return webhook


def enqueue_deliveries(
    session: Session,
    job_id: uuid.UUID,
    state: JobState,
    now: datetime,
    *,
    job: Job | None = None,
    subscribed: bool | None = None,
) -> list[Submitted]:
    """Insert one delivery job per subscribed endpoint (and the job's callback URL).

    A caller that already holds the finished row passes it as `job`, and `subscribed`
    when it knows whether any endpoint listens: each saves a round trip.
    """
    if DELIVER_TYPE not in registry:
        return []  # deliveries are not loaded (CONVEYOR_JOB_MODULES) in this process
    event = f"job.{state.value}"
    job = job or session.get(Job, job_id)
    if job is None or job.type == DELIVER_TYPE:
        return []  # deliveries of deliveries would never end
    targets: list[dict[str, Any]] = []
    if subscribed is not False:
        targets = [
            {"url": w.url, "webhook_id": str(w.id)}
            for w in session.scalars(
                select(Webhook).where(
                    Webhook.tenant_id == job.tenant_id,
                    Webhook.enabled.is_(True),
                    Webhook.events.contains([event]),
                )
            )
        ]
    if job.callback_url:
        targets.append({"url": job.callback_url, "webhook_id": None})
    if not targets:
        return []
    # A tiny delay makes them `scheduled`: the promoter publishes them on its next pass,
    # after this transaction commits.
    requests = [
        JobRequest(
            type=DELIVER_TYPE,
            payload={"job_id": str(job.id), "event": event, **target},
            delay_seconds=0.001,
        )
        for target in targets
    ]
    return submit_jobs(
        session,
        registry,
        requests,
        tenant_id=job.tenant_id,
        default_queue=job.queue,
        now=now,
        allow_internal=True,
    )
