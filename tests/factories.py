"""Factories for ledger rows used across tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity, create_tenant_identity
from conveyor.ledger.publishing import unmark_published
from conveyor.ledger.requests import JobRequest
from conveyor.ledger.submit import submit_jobs
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job, Tenant
from conveyor.registry import JobRegistry, load_job_types
from conveyor.settings import Settings

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
    *,
    registry: JobRegistry | None = None,
    **options: Any,
) -> Job:
    """Submit a job through the real submit path (and a tenant for it when none is given)."""
    tenant_id = tenant_id or tenant_factory(session).id
    request = JobRequest(type=type_name, payload=payload or {}, **options)
    unit = UnitOfWork.around(session)
    (submitted,) = submit_jobs(
        unit,
        registry or load_job_types(["conveyor.jobtypes.system"]),
        [request],
        tenant_id=tenant_id,
        default_queue=QUEUE,
        now=datetime.now(UTC),
    )
    # Nothing publishes a test's unit: as after a failed publish, the promoter will.
    unmark_published(session, [submitted.id])
    # submit_jobs returns a Submitted record, not a Job: tests take the session's own.
    return session.get_one(Job, submitted.id)
