"""Factories for ledger rows used across tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from conveyor.bootstrap import Identity, create_tenant_identity
from conveyor.models import Job, Tenant
from conveyor.registry import load_job_types
from conveyor.settings import Settings
from conveyor.submit import JobRequest, submit_jobs

QUEUE = "factory-queue"


def tenant_factory(session: Session, name: str = "Tenant") -> Tenant:
    """Insert a tenant."""
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def other_tenant(sessions: sessionmaker[Session], settings: Settings) -> Identity:
    """Create a second tenant with its admin and API key, to test the walls between tenants."""
    with sessions.begin() as session:
        return create_tenant_identity(
            session,
            settings.secret_key.get_secret_value(),
            tenant_name="Other",
            email="x@other.test",
            now=datetime.now(UTC),
        )


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
