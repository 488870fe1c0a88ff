"""The ledger's housekeeping moves, a bounded batch at a time: promote, expire, reap, prune.

Each batch is picked with `FOR UPDATE SKIP LOCKED`, so two housekeepers (two beats for a
moment) never block each other or move a job twice, and each move is the guarded statement
of `conveyor.ledger.statements`. Promoted jobs wait for the dispatcher; jobs the reconciler
re-drives are stamped `published_at` and noted on the unit of work, which publishes them
once committed.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, bindparam, delete, func, or_, select, tuple_, update
from sqlalchemy.engine import RowMapping

from conveyor.errors import WorkerLost
from conveyor.ledger.flow import wake_dispatcher
from conveyor.ledger.publishing import stamp_published
from conveyor.ledger.statements import NOW, ROW, transition
from conveyor.ledger.states import JobState, Move
from conveyor.ledger.transitions import ClaimedJob, fail, queue_messages, show, show_claim
from conveyor.ledger.work import UnitOfWork
from conveyor.live.store import GONE, LiveView
from conveyor.models import Job, JobEvent
from conveyor.registry import JobRegistry

# Worker losses a job may suffer beyond its attempt budget before the reaper fails it.
LOST_WORKER_GRACE = 2
_LIMIT: Any = bindparam("p_limit")
_DUE = func.coalesce(Job.scheduled_for, Job.created_at)


def _unexpired() -> Any:
    return or_(Job.expires_at.is_(None), Job.expires_at > NOW)


def _batch(chosen: Select[Any]) -> Select[Any]:
    return chosen.limit(_LIMIT).with_for_update(skip_locked=True)


@functools.cache
def _promote_statement() -> Select[Any]:
    return transition(
        Move.PROMOTE,
        # A job past its run time that still waits for dependencies waits on.
        where=[Job.scheduled_for <= NOW, _unexpired(), Job.dependencies_left == 0],
        values={"published_at": None},
        pick=lambda chosen: _batch(chosen.order_by(_DUE, Job.id)),
    )


def promote_due(unit: UnitOfWork, now: datetime, *, batch_size: int = 500) -> int:
    """Queue scheduled and retrying jobs whose time has come; return how many.

    The dispatcher publishes them (it is woken once this commits).
    """
    params = {"p_now": now, "p_limit": batch_size, "p_detail": None}
    rows = unit.session.execute(_promote_statement(), params).mappings().all()
    show(unit, rows)
    if rows:
        wake_dispatcher(unit)
    return len(rows)


def stale_queued(
    unit: UnitOfWork, now: datetime, *, older_than: float, batch_size: int = 500
) -> list[RowMapping]:
    """Return queued jobs published more than `older_than` seconds ago, locked."""
    return list(
        unit.session.execute(
            select(Job.id, Job.type, Job.queue, Job.priority, Job.state)
            .where(
                Job.state == JobState.QUEUED,
                Job.published_at <= now - timedelta(seconds=older_than),
            )
            .order_by(Job.published_at)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        )
        .mappings()
        .all()
    )


def redrive(unit: UnitOfWork, rows: Sequence[RowMapping], now: datetime) -> int:
    """Publish these queued jobs again (the reconciler found their message lost).

    Their queues are declared again: one may have been deleted since (RabbitMQ confirms a
    message to an exchange with no queue bound, and drops it).
    """
    stamp_published(unit.session, [row["id"] for row in rows], now)
    queue_messages(unit, rows, redeclare=True)
    return len(rows)


@functools.cache
def _expire_statement() -> Select[Any]:
    return transition(
        Move.EXPIRE,
        where=[Job.expires_at <= NOW],
        pick=_batch,
    )


def expire_due(unit: UnitOfWork, now: datetime, *, batch_size: int = 500) -> int:
    """Expire jobs that did not start before their `expires_at`; return how many."""
    params = {"p_now": now, "p_limit": batch_size, "p_detail": None}
    rows = unit.session.execute(_expire_statement(), params).mappings().all()
    show(unit, rows)
    return len(rows)


def reap_stale(
    unit: UnitOfWork,
    registry: JobRegistry,
    now: datetime,
    *,
    stale_after: float,
    batch_size: int = 100,
) -> list[tuple[uuid.UUID, str, JobState]]:
    """Retry or fail running jobs whose worker stopped sending heartbeats; return them.

    A lost worker is usually not the job's fault (a deploy, an OOM elsewhere, a killed
    host), so the first `LOST_WORKER_GRACE` losses of a job give it an extra attempt
    beyond `max_attempts`; a job that keeps killing its worker fails after that.
    """
    rows = (
        unit.session.execute(
            select(*ROW)
            .where(
                Job.state == JobState.RUNNING,
                Job.heartbeat_at < now - timedelta(seconds=stale_after),
            )
            .order_by(Job.heartbeat_at)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        )
        .mappings()
        .all()
    )
    if not rows:
        return []
    counted = unit.session.execute(
        select(JobEvent.job_id, func.count())
        .where(
            JobEvent.job_id.in_([row["id"] for row in rows]),
            JobEvent.detail["error_type"].astext == WorkerLost.__name__,
        )
        .group_by(JobEvent.job_id)
    )
    losses: dict[uuid.UUID, int] = {job_id: count for job_id, count in counted}
    lost = WorkerLost(f"the worker sent no heartbeat for {stale_after:.0f}s")
    reaped = []
    for row in rows:
        attempt = ClaimedJob.of(row)
        policy = registry.get(attempt.type).retry if attempt.type in registry else None
        outcome = fail(
            unit,
            attempt,
            lost,
            now,
            policy=policy,
            extra_attempt=losses.get(attempt.id, 0) < LOST_WORKER_GRACE,
        )
        if outcome is not None:
            reaped.append((attempt.id, attempt.type, outcome))
    return reaped


@functools.cache
def _overdue_statement() -> Select[Any]:
    return transition(
        Move.STOP,
        where=[Job.cancel_requested_at <= bindparam("p_deadline", type_=Job.finished_at.type)],
        pick=_batch,
    )


def stop_overdue(
    unit: UnitOfWork, now: datetime, *, grace: float, batch_size: int = 100
) -> list[uuid.UUID]:
    """Cancel running jobs that ignored a cancel request for `grace` seconds; return them.

    The caller revokes their tasks with terminate, so the process running them stops.
    """
    params = {
        "p_now": now,
        "p_deadline": now - timedelta(seconds=grace),
        "p_limit": batch_size,
        "p_detail": {
            "reason": f"did not stop within {grace:.0f}s of the cancel request; terminated"
        },
    }
    rows = unit.session.execute(_overdue_statement(), params).mappings().all()
    show(unit, rows)
    return [row["id"] for row in rows]


def beat_heartbeats(
    unit: UnitOfWork, claims: Sequence[ClaimedJob], now: datetime
) -> set[uuid.UUID]:
    """Record that these claims' worker is alive; return the jobs asked to cancel.

    Not a transition, and invisible to clients: no event, no version. Each row is named by
    its claim's token, so a run whose claim was lost (or taken over) refreshes nothing.
    A refreshed row makes this statement a synchronous commit after its claim's, so the
    claim is durable once it commits: its pending views are shown then.
    """
    by_id = {job.id: job for job in claims}
    rows = unit.session.execute(
        update(Job)
        .where(
            tuple_(Job.id, Job.claim_token).in_([(j.id, j.claim_token) for j in claims]),
            Job.state == JobState.RUNNING,
        )
        .values(heartbeat_at=now)
        .returning(Job.id, Job.cancel_requested_at)
        .execution_options(synchronize_session=False)
    ).all()
    for row in rows:
        show_claim(unit, by_id[row.id])
    return {row.id for row in rows if row.cancel_requested_at is not None}


def delete_finished(unit: UnitOfWork, before: datetime, *, batch_size: int = 1000) -> int:
    """Delete one batch of jobs finished before `before` (their events go with them)."""
    old = (
        select(Job.id)
        .where(Job.finished_at < before)
        .order_by(Job.finished_at)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    )
    pruned = unit.session.scalars(delete(Job).where(Job.id.in_(old)).returning(Job.id)).all()
    # A pruned job is gone for good: no view may show it again.
    unit.show(LiveView(job_id, GONE) for job_id in pruned)
    return len(pruned)


def detach_schedule(unit: UnitOfWork, schedule_id: uuid.UUID) -> None:
    """Unlink a schedule's jobs before the schedule is deleted; their views move with them.

    The foreign key would null `schedule_id` by itself, unseen by the live views, which
    would keep showing the schedule.
    """
    rows = unit.session.execute(
        update(Job)
        .where(Job.schedule_id == schedule_id)
        .values(schedule_id=None, version=Job.version + 1)
        .returning(Job.id, Job.version)
        .execution_options(synchronize_session=False)
    ).all()
    # Tombstones at the new versions: the next read of each fills its view from the ledger.
    unit.show(LiveView(job_id, version) for job_id, version in rows)
