"""Operators' actions on jobs: cancel and retry, one or many, each audited with the change.

The API (`api/job_control.py`) and the console (`api/console/`) both call these, so a
retry from either is the same guarded ledger transition with the same audit entry in the
same transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from conveyor.audit import audit
from conveyor.auth.keys import Principal
from conveyor.errors import Conflict, NotFound
from conveyor.ledger import transitions
from conveyor.ledger.reads import JobFilter
from conveyor.ledger.states import UNFINISHED
from conveyor.ledger.transitions import MAX_BULK_RETRY, CancelOutcome
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job
from conveyor.registry import JobRegistry

# The most jobs one bulk cancel (of a selection or of a filter) touches.
MAX_BULK_CANCEL = 1000


def actor(principal: Principal) -> dict[str, Any]:
    """Return who acted, for the job's history."""
    return {
        "user_id": str(principal.user_id) if principal.user_id else None,
        "api_key_id": str(principal.api_key_id) if principal.api_key_id else None,
    }


def cancel_job(
    unit: UnitOfWork,
    registry: JobRegistry,
    principal: Principal,
    job_id: uuid.UUID,
    now: datetime,
) -> tuple[dict[str, Any], CancelOutcome]:
    """Cancel the caller's job (or ask a running one to stop) and audit it."""
    view, outcome = transitions.cancel(
        unit, registry, principal.tenant_id, job_id, now, actor(principal)
    )
    audit(unit.session, principal, "job.cancel", "job", job_id, {"outcome": outcome})
    return view, outcome


def retry_job(
    unit: UnitOfWork,
    registry: JobRegistry,
    principal: Principal,
    job_id: uuid.UUID,
    now: datetime,
) -> dict[str, Any]:
    """Run the caller's dead job again with a fresh attempt budget, and audit it."""
    view = transitions.retry(unit, registry, principal.tenant_id, job_id, now, actor(principal))
    audit(unit.session, principal, "job.retry", "job", job_id)
    return view


def retry_matching_jobs(
    unit: UnitOfWork,
    registry: JobRegistry,
    principal: Principal,
    filters: JobFilter,
    now: datetime,
    *,
    limit: int,
    described: dict[str, Any],
) -> list[dict[str, Any]]:
    """Run again up to `limit` dead jobs matching `filters`; one audit entry says which."""
    views = transitions.retry_matching(
        unit, registry, principal.tenant_id, filters, now, actor(principal), limit=limit
    )
    detail = {**described, "count": len(views)}
    audit(unit.session, principal, "job.retry_many", "jobs", "*", detail)
    return views


@dataclass
class BulkOutcome:
    """What a bulk action did: the jobs it moved and those it left, with why."""

    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def cancel_jobs(
    unit: UnitOfWork,
    registry: JobRegistry,
    principal: Principal,
    job_ids: Iterable[uuid.UUID],
    now: datetime,
) -> BulkOutcome:
    """Cancel each of the caller's jobs (at most `MAX_BULK_CANCEL`); one that cannot be is skipped.

    Each job goes through `cancel_job`, so each has its own guarded transition and audit
    entry; an id that is not the caller's is skipped as not found, telling nothing more.
    """
    return _each(
        list(job_ids)[:MAX_BULK_CANCEL],
        lambda job_id: cancel_job(unit, registry, principal, job_id, now),
    )


def retry_jobs(
    unit: UnitOfWork,
    registry: JobRegistry,
    principal: Principal,
    job_ids: Iterable[uuid.UUID],
    now: datetime,
) -> BulkOutcome:
    """Retry each of the caller's jobs (at most `MAX_BULK_RETRY`); one that cannot be is skipped."""
    return _each(
        list(job_ids)[:MAX_BULK_RETRY],
        lambda job_id: retry_job(unit, registry, principal, job_id, now),
    )


def _each(job_ids: list[uuid.UUID], act: Callable[[uuid.UUID], object]) -> BulkOutcome:
    """Act on each job; one the action refuses (not found, wrong state) is skipped, with why."""
    outcome = BulkOutcome()
    for job_id in job_ids:
        try:
            act(job_id)
        except (Conflict, NotFound) as exc:
            outcome.skipped[str(job_id)] = exc.detail
        else:
            outcome.done.append(str(job_id))
    return outcome


def unfinished_ids(
    unit: UnitOfWork, tenant_id: uuid.UUID, filters: JobFilter, limit: int = MAX_BULK_CANCEL
) -> list[uuid.UUID]:
    """Return the ids of the tenant's unfinished jobs matching `filters`, oldest first."""
    query = filters.apply(
        select(Job.id).where(Job.tenant_id == tenant_id, Job.state.in_(tuple(UNFINISHED)))
    )
    return list(
        unit.session.scalars(query.order_by(Job.created_at).limit(min(limit, MAX_BULK_CANCEL)))
    )
