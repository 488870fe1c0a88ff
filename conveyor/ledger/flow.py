"""Flow control data: limits, queue pauses and unique keys, as the ledger keeps them.

A limit holds the jobs that name it (a tenant's `limit_key`) or the jobs of a type that
declares one in code (every tenant's, keyed `type:<name>`). Its `running` count is taken
and given back by the very statements that move jobs into and out of `running`
(`conveyor.ledger.statements`), so it needs no repair: a new limit counts the jobs
already running under its key. A pause holds a queue's jobs for one tenant or for all.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from conveyor.errors import NotFound
from conveyor.ledger.statements import DISPATCH_CHANNEL, TYPE_LIMIT_PREFIX
from conveyor.ledger.states import JobState
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job, Limit, QueuePause, UniqueKey
from conveyor.registry import JobRegistry


@dataclass(frozen=True)
class LimitState:
    """A limit as its tenant sees it: its bounds, and the jobs it holds now."""

    key: str
    max_running: int | None
    per_second: float | None
    running: int
    waiting: int
    updated_at: datetime


def wake_dispatcher(unit: UnitOfWork) -> None:
    """Tell the dispatcher, once this unit commits, that room may have appeared."""
    unit.session.execute(select(func.pg_notify(DISPATCH_CHANNEL, "")))


def _running(tenant_id: uuid.UUID | None, key: str) -> object:
    """Return the count of jobs running under a limit, as a scalar subquery."""
    held = (
        Job.type == key.removeprefix(TYPE_LIMIT_PREFIX)
        if tenant_id is None
        else (Job.tenant_id == tenant_id) & (Job.limit_key == key)
    )
    return select(func.count()).where(held, Job.state == JobState.RUNNING).scalar_subquery()


def set_limit(
    unit: UnitOfWork,
    tenant_id: uuid.UUID,
    key: str,
    *,
    max_running: int | None,
    per_second: float | None,
    now: datetime,
) -> LimitState:
    """Create or change the tenant's limit `key`; a new one counts the jobs running under it."""
    statement = (
        pg_insert(Limit)
        .values(
            tenant_id=tenant_id,
            key=key,
            max_running=max_running,
            per_second=per_second,
            running=_running(tenant_id, key),
            updated_at=now,
        )
        .on_conflict_do_update(
            index_elements=[Limit.tenant_id, Limit.key],
            index_where=Limit.tenant_id.is_not(None),
            set_={"max_running": max_running, "per_second": per_second, "updated_at": now},
        )
    )
    unit.session.execute(statement)
    wake_dispatcher(unit)
    return get_limit(unit.session, tenant_id, key)


def _states(session: Session, tenant_id: uuid.UUID, keys: Sequence[str] | None) -> list[LimitState]:
    waiting = (
        select(func.count())
        .where(
            Job.tenant_id == tenant_id,
            Job.limit_key == Limit.key,
            Job.state == JobState.QUEUED,
        )
        .scalar_subquery()
    )
    query = select(
        Limit.key,
        Limit.max_running,
        Limit.per_second,
        Limit.running,
        waiting,
        Limit.updated_at,
    ).where(Limit.tenant_id == tenant_id)
    if keys is not None:
        query = query.where(Limit.key.in_(keys))
    return [LimitState(*row) for row in session.execute(query.order_by(Limit.key))]


def get_limit(session: Session, tenant_id: uuid.UUID, key: str) -> LimitState:
    """Return the tenant's limit `key` with its live counts, or raise `NotFound`."""
    found = _states(session, tenant_id, [key])
    if not found:
        raise NotFound(f"there is no limit {key}")
    return found[0]


def list_limits(session: Session, tenant_id: uuid.UUID) -> list[LimitState]:
    """Return the tenant's limits by key, with their live counts."""
    return _states(session, tenant_id, None)


def delete_limit(unit: UnitOfWork, tenant_id: uuid.UUID, key: str) -> None:
    """Remove the tenant's limit `key` (its jobs run unlimited), or raise `NotFound`."""
    gone = unit.session.execute(
        delete(Limit).where(Limit.tenant_id == tenant_id, Limit.key == key).returning(Limit.id)
    ).first()
    if gone is None:
        raise NotFound(f"there is no limit {key}")
    wake_dispatcher(unit)


def sync_type_limits(unit: UnitOfWork, registry: JobRegistry, now: datetime) -> None:
    """Make the tenant-less limits match what the job types declare in code."""
    declared = {
        f"{TYPE_LIMIT_PREFIX}{job_type.name}": job_type.limit
        for job_type in registry
        if job_type.limit is not None
    }
    unit.session.execute(
        delete(Limit).where(Limit.tenant_id.is_(None), Limit.key.not_in(list(declared) or [""]))
    )
    for key, limit in declared.items():
        unit.session.execute(
            pg_insert(Limit)
            .values(
                tenant_id=None,
                key=key,
                max_running=limit.max_running,
                per_second=limit.per_second,
                running=_running(None, key),
                updated_at=now,
            )
            .on_conflict_do_update(
                index_elements=[Limit.key],
                index_where=Limit.tenant_id.is_(None),
                set_={
                    "max_running": limit.max_running,
                    "per_second": limit.per_second,
                    "updated_at": now,
                },
            )
        )


def pause(unit: UnitOfWork, tenant_id: uuid.UUID | None, queue: str) -> None:
    """Hold the queue's jobs (the tenant's, or everyone's with no tenant); running ones finish."""
    elements = [QueuePause.tenant_id, QueuePause.queue] if tenant_id else [QueuePause.queue]
    unit.session.execute(
        pg_insert(QueuePause)
        .values(tenant_id=tenant_id, queue=queue)
        .on_conflict_do_nothing(
            index_elements=elements,
            index_where=QueuePause.tenant_id.is_not(None)
            if tenant_id
            else QueuePause.tenant_id.is_(None),
        )
    )


def resume(unit: UnitOfWork, tenant_id: uuid.UUID | None, queue: str) -> None:
    """Let the queue's jobs start again (the tenant's pause, or the deployment's)."""
    held = QueuePause.tenant_id == tenant_id if tenant_id else QueuePause.tenant_id.is_(None)
    unit.session.execute(delete(QueuePause).where(held, QueuePause.queue == queue))
    wake_dispatcher(unit)


def paused_queues(session: Session, tenant_id: uuid.UUID) -> dict[str, bool]:
    """Return the queues paused for the tenant, each with whether the pause is everyone's."""
    rows = session.execute(
        select(QueuePause.queue, QueuePause.tenant_id).where(
            (QueuePause.tenant_id == tenant_id) | QueuePause.tenant_id.is_(None)
        )
    )
    paused: dict[str, bool] = {}
    for queue, owner in rows:
        paused[queue] = paused.get(queue, False) or owner is None
    return paused


def claim_unique_key(
    unit: UnitOfWork,
    tenant_id: uuid.UUID,
    job_type: str,
    key: str,
    job_id: uuid.UUID,
    *,
    held_until: datetime | None,
    now: datetime,
) -> uuid.UUID | None:
    """Take a unique key for a new job, or return the job that holds it.

    The key is free once its job has finished (the ledger releases it) and its window
    (`held_until`) has passed. Concurrent claims of one key serialise on its row, and the
    loser decides on the winner's committed row.
    """
    taken = unit.session.execute(
        pg_insert(UniqueKey)
        .values(tenant_id=tenant_id, type=job_type, key=key, job_id=job_id, held_until=held_until)
        .on_conflict_do_update(
            index_elements=[UniqueKey.tenant_id, UniqueKey.type, UniqueKey.key],
            set_={"job_id": job_id, "held_until": held_until, "released_at": None},
            where=UniqueKey.released_at.is_not(None)
            & (UniqueKey.held_until.is_(None) | (UniqueKey.held_until <= now)),
        )
        .returning(UniqueKey.job_id)
    ).scalar_one_or_none()
    if taken is not None:
        return None
    holder: uuid.UUID = unit.session.execute(
        select(UniqueKey.job_id).where(
            UniqueKey.tenant_id == tenant_id, UniqueKey.type == job_type, UniqueKey.key == key
        )
    ).scalar_one()
    return holder


@dataclass(frozen=True)
class FlowStats:
    """The deployment's flow control at a glance, for `/metrics`."""

    # (tenant id or "*" for a job type's limit, key, running, waiting)
    limits: list[tuple[str, str, int, int]]
    # (queue, why: a `Waiting` value or "dispatch" for a job the dispatcher has yet to
    # look at, how many)
    waiting: list[tuple[str, str, int]]


def flow_stats(session: Session) -> FlowStats:
    """Return every limit's running and waiting jobs, and the waiting jobs per queue and reason."""
    waiting_for_key = (
        select(func.count())
        .where(
            Job.state == JobState.QUEUED,
            (
                (Limit.tenant_id.is_(None))
                & (Job.type == func.substr(Limit.key, len(TYPE_LIMIT_PREFIX) + 1))
            )
            | ((Job.tenant_id == Limit.tenant_id) & (Job.limit_key == Limit.key)),
        )
        .scalar_subquery()
    )
    limits = [
        (str(tenant_id) if tenant_id else "*", key, running, waiting)
        for tenant_id, key, running, waiting in session.execute(
            select(Limit.tenant_id, Limit.key, Limit.running, waiting_for_key)
        )
    ]
    reason = func.coalesce(Job.waiting_for, "dispatch")
    waiting = [
        (queue, why, n)
        for queue, why, n in session.execute(
            select(Job.queue, reason, func.count())
            .where(Job.state == JobState.QUEUED, Job.published_at.is_(None))
            .group_by(Job.queue, reason)
        )
    ]
    return FlowStats(limits, waiting)
