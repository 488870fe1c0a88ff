"""Factories for ledger rows used across tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from conveyor.models import Job, Tenant
from conveyor.registry import load_job_types
from conveyor.submit import JobRequest, submit_jobs

QUEUE = "factory-queue"


def tenant_factory(session: Session, name: str = "Tenant") -> Tenant:
    """Insert a tenant."""
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def job_factory(
    session: Session,
    tenant_id: uuid.UUID | None = None,
    type_name: str = "system.noop",
    payload: dict[str, Any] | None = None,
    **options: Any,
) -> Job:
    """Submit a job through the real submit path (and a tenant for it when none is given)."""
    tenant_id = tenant_id or tenant_factory(session).id
    request = JobRequest(type=type_name, payload=payload or {}, **options)
    (submitted,) = submit_jobs(
        session,
        load_job_types(["conveyor.jobtypes.system"]),
        [request],
        tenant_id=tenant_id,
        default_queue=QUEUE,
        now=datetime.now(UTC),
    )
    # submit_jobs returns a Submitted record, not a Job: tests take the session's own.
    return session.get_one(Job, submitted.id)
