"""Factories for ledger rows used across tests."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from conveyor.jobs import submit_job
from conveyor.models import Job, Tenant
from conveyor.registry import load_job_types

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
) -> Job:
    """Submit a job through the real submit path (and a tenant for it when none is given)."""
    tenant_id = tenant_id or tenant_factory(session).id
    return submit_job(
        session,
        load_job_types(["conveyor.jobtypes.system"]),
        tenant_id=tenant_id,
        type_name=type_name,
        payload=payload or {},
        default_queue=QUEUE,
    )
