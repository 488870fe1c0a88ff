"""The job lifecycle after submit: claim, finish, promote, expire, reap; one guarded UPDATE each.

Functions here flush and never commit: the caller (a request handler, the task runner,
the housekeeper) owns the transaction. Every transition writes one `job_events` row
beside the guarded `UPDATE ... WHERE state IN (...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    Exists,
    Select,
    Update,
    and_,
    bindparam,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import InstrumentedAttribute, Session

from conveyor.models import Job, JobEvent, Webhook
from conveyor.registry import RetryPolicy
from conveyor.snapshots import Snapshot, note, note_tombstones
from conveyor.states import NOT_STARTED, JobState, sources_of
from conveyor.webhooks import DELIVER_TYPE, enqueue_deliveries

ERROR_MESSAGE_LIMIT = 2000


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now owns for one attempt."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    type: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    started_at: datetime | None
    worker: str | None = None
    # When the job fell due (created, or its delay or backoff over): the start of its wait.
    due_at: datetime | None = None
    # Whether its success enqueues deliveries (a callback URL, a subscribed webhook), as of
    # the claim: then only a transaction can finish it (succeed_job_quietly says why).
    success_delivers: bool = True


_DUE_AT = func.coalesce(Job.scheduled_for, Job.created_at).label("due_at")
# The columns of a ClaimedJob, in its field order.
_CLAIMED = (
    Job.id,
    Job.tenant_id,
    Job.type,
    Job.payload,
    Job.attempt,
    Job.max_attempts,
    Job.started_at,
    Job.worker,
    _DUE_AT,
)
_CLAIMED_FIELDS = tuple(f.name for f in dataclasses.fields(ClaimedJob))
# Every column of a job, and the attribute each one maps to: a transition returns the
# whole row (no extra round trip) so its snapshot is exactly what the ledger now holds.
_ROW = tuple(Job.__table__.c)
_ROW_ATTRIBUTES = tuple(
    (column.name, Job.__mapper__.get_property_by_column(column).key) for column in _ROW
)


def _note_row(session: Session, values: Any) -> Job:
    """Note the snapshot of a row a transition returned with its event's id; return the row.

    The `Job` is transient (never added to the session): a read-only copy of the row.
    """
    job = Job(**{attribute: values[name] for name, attribute in _ROW_ATTRIBUTES})
    note(session, [Snapshot.of(job, values["event_id"])])
    return job


def record_event(
    session: Session,
    job_id: uuid.UUID,
    source: JobState | None,
    target: JobState,
    attempt: int,
    detail: dict[str, Any] | None = None,
) -> int:
    """Append one transition to a job's history and return its id; webhooks go with a finish."""
    event_id = session.execute(
        insert(JobEvent)
        .values(job_id=job_id, from_state=source, to_state=target, attempt=attempt, detail=detail)
        .returning(JobEvent.id)
    ).scalar_one()
    # The caller changed the row without reading it back: invalidate its snapshot.
    note_tombstones(session, [(job_id, event_id)])
    if target.is_terminal:
        enqueue_deliveries(session, job_id, target, datetime.now(UTC))
    return event_id


def mark_published(session: Session, job_ids: Sequence[uuid.UUID], now: datetime) -> None:
    """Record that the broker accepted these jobs' messages, so the promoter leaves them be.

    The promoter's, the reconciler's and the schedules' publishes mark this way. API
    submits do not: they write `published_at` with the job (`submit_jobs(publishing=True)`)
    and only undo it, with `unmark_published`, when the publish fails.
    """
    session.execute(_mark_published_statement(), {"p_job_ids": list(job_ids), "p_now": now})


def unmark_published(session: Session, job_ids: Sequence[uuid.UUID]) -> None:
    """Clear `published_at` of queued jobs whose publish failed, so the promoter publishes them."""
    session.execute(_unmark_published_statement(), {"p_job_ids": list(job_ids)})


@functools.cache
def _unmark_published_statement() -> Update:
    return (
        update(Job)
        .where(
            Job.id.in_(bindparam("p_job_ids", expanding=True, type_=Job.id.type)),
            # A job a worker already took (the failed publish got through after all) needs
            # nothing from the promoter.
            Job.state == JobState.QUEUED,
        )
        .values(published_at=None)
        .execution_options(synchronize_session=False)
    )


@functools.cache
def _mark_published_statement() -> Update:
    # Built once, like the claim and finish: building it per submit showed in its profile.
    return (
        update(Job)
        .where(
            Job.id.in_(bindparam("p_job_ids", expanding=True, type_=Job.id.type)),
            Job.published_at.is_(None),
        )
        .values(published_at=bindparam("p_now", type_=Job.published_at.type))
        .execution_options(synchronize_session=False)
    )


def claim_job(session: Session, job_id: uuid.UUID, worker: str, now: datetime) -> ClaimedJob | None:
    """Take a queued, unexpired job for one attempt; `None` means there is nothing to run.

    That covers a duplicate or redelivered message, a cancelled job, and an expired one
    (the housekeeper marks those `expired`).
    """
    params = {"p_job_id": job_id, "p_now": now, "p_worker": worker, "p_detail": {"worker": worker}}
    row = session.execute(_claim_statement(), params).one_or_none()
    if row is None:
        return None
    values = row._mapping
    _note_row(session, values)
    return ClaimedJob(**{name: values[name] for name in _CLAIMED_FIELDS})


# The claim and finish statements are built once, with bound parameters: building and
# hashing these CTEs per call took more of a worker's time than PostgreSQL took to run
# them (py-spy during `make bench`). Parameter names avoid the jobs table's column names.
@functools.cache
def _claim_statement() -> Select[Any]:
    now = bindparam("p_now", type_=Job.started_at.type)
    moved = (
        update(Job)
        .where(
            Job.id == bindparam("p_job_id", type_=Job.id.type),
            Job.state.in_(sources_of(JobState.RUNNING)),
            or_(Job.expires_at.is_(None), Job.expires_at > now),
        )
        .values(
            state=JobState.RUNNING,
            attempt=Job.attempt + 1,
            started_at=now,
            heartbeat_at=now,
            worker=bindparam("p_worker", type_=Job.worker.type),
            cancel_requested_at=None,
        )
        .returning(*_ROW, _DUE_AT)
        .cte("moved")
    )
    detail = bindparam("p_detail", type_=JobEvent.detail.type)
    delivers = and_(
        moved.c.type != DELIVER_TYPE,
        or_(
            moved.c.callback_url.is_not(None),
            _subscribed(moved.c.tenant_id, JobState.SUCCEEDED),
        ),
    )
    return _with_event(
        moved, JobState.QUEUED, JobState.RUNNING, moved.c.attempt, detail
    ).add_columns(delivers.label("success_delivers"))


def _subscribed(
    tenant_id: ColumnElement[uuid.UUID] | InstrumentedAttribute[uuid.UUID], target: JobState
) -> Exists:
    """Return whether an enabled webhook of the tenant listens for jobs reaching `target`."""
    return (
        select(Webhook.id)
        .where(
            Webhook.tenant_id == tenant_id,
            Webhook.enabled.is_(True),
            Webhook.events.contains([f"job.{target.value}"]),
        )
        .exists()
    )


@functools.cache
def _finish_statement(target: JobState, columns: tuple[str, ...], quiet: bool) -> Select[Any]:
    guards = [
        Job.id == bindparam("p_job_id", type_=Job.id.type),
        Job.state == JobState.RUNNING,
        Job.attempt == bindparam("p_attempt", type_=Job.attempt.type),
    ]
    if quiet:
        # Moves nothing when the transition would enqueue deliveries (enqueue_deliveries'
        # rules): those must be inserted in the transition's own transaction.
        guards.append(
            or_(
                Job.type == DELIVER_TYPE,
                and_(Job.callback_url.is_(None), ~_subscribed(Job.tenant_id, target)),
            )
        )
    moved = (
        update(Job)
        .where(*guards)
        .values(
            state=target,
            **{c: bindparam(f"p_{c}", type_=Job.__table__.c[c].type) for c in columns},
        )
        .returning(*_ROW)
        .cte("moved")
    )
    detail = bindparam("p_detail", type_=JobEvent.detail.type)
    stmt = _with_event(moved, JobState.RUNNING, target, moved.c.attempt, detail)
    if target.is_terminal:
        # Whether any endpoint listens, asked in the same statement: most tenants have
        # none, and then a finish costs no further round trip. A quiet finish has none.
        subscribed = literal(False) if quiet else _subscribed(moved.c.tenant_id, target)
        stmt = stmt.add_columns(subscribed.label("subscribed"))
    return stmt


def _with_event(
    moved: CTE,
    source: JobState | None,
    target: JobState,
    attempt: ColumnElement[int] | int,
    detail: ColumnElement[Any] | dict[str, Any] | None,
) -> Select[Any]:
    """Select what the guarded UPDATE `moved` returned, inserting its event in the same statement.

    One round trip per transition instead of two; the event is written only if a row moved.
    The row comes back with the event's id as `event_id`.
    """
    event = (
        insert(JobEvent)
        .from_select(
            ["job_id", "from_state", "to_state", "attempt", "detail"],
            select(
                moved.c.id,
                literal(source, JobEvent.from_state.type),
                literal(target, JobEvent.to_state.type),
                attempt if isinstance(attempt, ColumnElement) else literal(attempt),
                detail
                if isinstance(detail, ColumnElement)
                else literal(detail, JobEvent.detail.type),
            ),
        )
        .returning(JobEvent.id, JobEvent.job_id)
        .cte("event")
    )
    # The event's id versions the job's snapshot (conveyor.snapshots).
    return select(moved, event.c.id.label("event_id")).join_from(
        moved, event, moved.c.id == event.c.job_id
    )


def _finish(
    session: Session,
    job: ClaimedJob,
    target: JobState,
    detail: dict[str, Any] | None = None,
    *,
    quiet: bool = False,
    **values: Any,
) -> bool:
    """Move a running attempt to `target`; `False` if the attempt no longer owns the job.

    `quiet` moves it only if the transition enqueues no delivery (else `False` too).
    """
    stmt = _finish_statement(target, tuple(sorted(values)), quiet)
    params = {f"p_{name}": value for name, value in values.items()}
    params |= {"p_job_id": job.id, "p_attempt": job.attempt, "p_detail": detail}
    row = session.execute(stmt, params).one_or_none()
    if row is None:
        return False
    finished = _note_row(session, row._mapping)
    if target.is_terminal:
        # What record_event does for every other terminal transition.
        enqueue_deliveries(
            session, job.id, target, datetime.now(UTC), job=finished, subscribed=row.subscribed
        )
    return True


def _timings(job: ClaimedJob, now: datetime) -> dict[str, Any]:
    started = job.started_at
    return {
        "worker": job.worker,
        "started_at": started.isoformat() if started else None,
        "seconds": round((now - started).total_seconds(), 3) if started else None,
    }


def succeed_job(
    session: Session, job: ClaimedJob, result: dict[str, Any] | None, now: datetime
) -> bool:
    """Finish an attempt as `succeeded` with its result."""
    return _finish(
        session, job, JobState.SUCCEEDED, _timings(job, now), result=result, finished_at=now
    )


def succeed_job_quietly(
    session: Session, job: ClaimedJob, result: dict[str, Any] | None, now: datetime
) -> bool:
    """Succeed an attempt in one statement, unless its success enqueues deliveries.

    For an autocommit session, when the job wrote nothing: with no delivery to insert
    beside it, the guarded statement is the whole unit of work (one round trip instead of
    BEGIN, statement, COMMIT). `False` moved nothing: the attempt lost the job, or the job
    has a callback URL or a webhook listens (deliveries must commit with the success);
    `succeed_job` in a transaction tells the two apart.
    """
    return _finish(
        session,
        job,
        JobState.SUCCEEDED,
        _timings(job, now),
        quiet=True,
        result=result,
        finished_at=now,
    )


def cancel_running_job(session: Session, job: ClaimedJob, now: datetime) -> bool:
    """Finish an attempt that stopped because someone cancelled it."""
    return _finish(session, job, JobState.CANCELLED, _timings(job, now), finished_at=now)


def retry_delay(attempt: int, policy: RetryPolicy) -> timedelta:
    """Return an exponential backoff with full jitter for the attempt just failed."""
    ceiling = min(policy.backoff_cap, policy.backoff_base * 2 ** max(0, attempt - 1))
    return timedelta(seconds=random.uniform(0, ceiling))  # noqa: S311 - jitter, not crypto


def fail_job(
    session: Session,
    job: ClaimedJob,
    error: BaseException,
    now: datetime,
    *,
    policy: RetryPolicy | None = None,
    retryable: bool = True,
) -> JobState | None:
    """Finish a failed attempt: `retrying` with a backoff while attempts remain, else `failed`.

    The event keeps the attempt's error, worker and timings; `None` means the attempt no
    longer owned the job.
    """
    error_type = type(error).__name__
    message = str(error)[:ERROR_MESSAGE_LIMIT] or error_type
    detail = {
        "error_type": error_type,
        "error_message": message,
        **_timings(job, now),
        # Errors may add facts of their own (a webhook's HTTP status, say).
        **getattr(error, "event_detail", {}),
    }
    values: dict[str, Any] = {"error_type": error_type, "error_message": message}
    if retryable and job.attempt < job.max_attempts:
        target = JobState.RETRYING
        values["scheduled_for"] = now + retry_delay(job.attempt, policy or RetryPolicy())
        values["published_at"] = None
    else:
        target = JobState.FAILED
        values["finished_at"] = now
    if not _finish(session, job, target, detail, **values):
        return None
    return target


def promote_due_jobs(
    session: Session,
    now: datetime,
    *,
    batch_size: int = 500,
    unpublished_after: float = 10.0,
    reasons: Counter[str] | None = None,
) -> list[Job]:
    """Queue due jobs, and take back queued jobs whose publish was never confirmed.

    Two kinds: scheduled/retrying jobs now due, and queued jobs with no `published_at`
    (their publish failed: the broker was down at submit, or the promoter's own publish
    failed after its commit). Each comes back queued with `published_at` cleared:
    the caller commits, then publishes, then marks them published. Publishing after the
    commit matters: a worker's claim only sees committed rows, so an id published earlier
    would be skipped and lost.
    Rows are locked with `FOR UPDATE SKIP LOCKED` so promoters never block each other.
    `reasons`, when given, counts them as `promoted` (fell due) or `republished`.
    """
    waiting = (JobState.SCHEDULED, JobState.RETRYING)
    queued_since = func.coalesce(Job.scheduled_for, Job.created_at)
    jobs = list(
        session.scalars(
            select(Job)
            .where(
                (Job.state.in_(waiting) & (Job.scheduled_for <= now))
                | (
                    (Job.state == JobState.QUEUED)
                    & Job.published_at.is_(None)
                    & (queued_since <= now - timedelta(seconds=unpublished_after))
                )
            )
            .where(or_(Job.expires_at.is_(None), Job.expires_at > now))
            .order_by(queued_since, Job.id)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
            # Transitions written as one CTE statement bypass the identity map: reload.
            .execution_options(populate_existing=True)
        )
    )
    for job in jobs:
        if reasons is not None:
            reasons["republished" if job.state == JobState.QUEUED else "promoted"] += 1
        if job.state != JobState.QUEUED:
            record_event(session, job.id, JobState(job.state), JobState.QUEUED, job.attempt)
        job.state = JobState.QUEUED
        job.published_at = None
    session.flush()
    return jobs


def stale_queued_jobs(
    session: Session, now: datetime, *, older_than: float, batch_size: int = 500
) -> list[Job]:
    """Return queued jobs published more than `older_than` seconds ago, locked."""
    return list(
        session.scalars(
            select(Job)
            .where(
                Job.state == JobState.QUEUED,
                Job.published_at <= now - timedelta(seconds=older_than),
            )
            .order_by(Job.published_at)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        )
    )


def expire_jobs(session: Session, now: datetime, *, batch_size: int = 500) -> int:
    """Mark jobs that did not start before their `expires_at` as `expired`."""
    rows = session.execute(
        select(Job.id, Job.state, Job.attempt)
        .where(Job.state.in_(NOT_STARTED), Job.expires_at <= now)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return 0
    session.execute(
        update(Job)
        .where(Job.id.in_([r.id for r in rows]))
        .values(state=JobState.EXPIRED, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    for row in rows:
        record_event(session, row.id, JobState(row.state), JobState.EXPIRED, row.attempt)
    return len(rows)


def beat_heartbeats(
    session: Session, job_ids: Sequence[uuid.UUID], now: datetime
) -> set[uuid.UUID]:
    """Record that these running jobs' worker is alive; return those asked to cancel."""
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.state == JobState.RUNNING)
        .values(heartbeat_at=now)
        .returning(Job.id, Job.cancel_requested_at)
        .execution_options(synchronize_session=False)
    ).all()
    return {row.id for row in rows if row.cancel_requested_at is not None}


# Worker losses a job may suffer beyond its attempt budget before the reaper fails it.
LOST_WORKER_GRACE = 2


class WorkerLost(Exception):
    """Stands for a worker that stopped mid-job: killed, out of memory, or past its limit."""


def running_attempt(session: Session, job_id: uuid.UUID) -> ClaimedJob | None:
    """Return the job's current attempt, locked, if it is running."""
    row = session.execute(
        select(*_CLAIMED).where(Job.id == job_id, Job.state == JobState.RUNNING).with_for_update()
    ).one_or_none()
    return ClaimedJob(*row) if row is not None else None


def reap_stale_jobs(
    session: Session, now: datetime, *, stale_after: float, batch_size: int = 100
) -> list[tuple[uuid.UUID, JobState]]:
    """Retry or fail running jobs whose worker stopped sending heartbeats.

    A lost worker is usually not the job's fault (a deploy, an OOM elsewhere, a killed
    host), so the first `LOST_WORKER_GRACE` losses of a job give it an extra attempt
    beyond `max_attempts`; a job that keeps killing its worker fails after that.
    """
    rows = session.execute(
        select(*_CLAIMED)
        .where(
            Job.state == JobState.RUNNING,
            Job.heartbeat_at < now - timedelta(seconds=stale_after),
        )
        .order_by(Job.heartbeat_at)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    ).all()
    lost = WorkerLost(f"the worker sent no heartbeat for {stale_after:.0f}s")
    losses: dict[uuid.UUID, int] = {}
    if rows:
        counted = session.execute(
            select(JobEvent.job_id, func.count())
            .where(
                JobEvent.job_id.in_([row.id for row in rows]),
                JobEvent.detail["error_type"].astext == WorkerLost.__name__,
            )
            .group_by(JobEvent.job_id)
        )
        losses = {job_id: count for job_id, count in counted}
    reaped = []
    for row in rows:
        attempt = ClaimedJob(*row)
        if attempt.attempt >= attempt.max_attempts and losses.get(row.id, 0) < LOST_WORKER_GRACE:
            session.execute(
                update(Job).where(Job.id == row.id).values(max_attempts=Job.max_attempts + 1)
            )
            attempt = dataclasses.replace(attempt, max_attempts=attempt.max_attempts + 1)
        outcome = fail_job(session, attempt, lost, now)
        if outcome is not None:
            reaped.append((row.id, outcome))
    return reaped


def overdue_cancellations(
    session: Session, now: datetime, *, grace: float, batch_size: int = 100
) -> list[uuid.UUID]:
    """Cancel running jobs that ignored a cancel request for `grace` seconds; return them.

    The caller revokes their tasks with terminate, so the process running them stops.
    """
    rows = session.execute(
        select(Job.id, Job.attempt)
        .where(
            Job.state == JobState.RUNNING,
            Job.cancel_requested_at <= now - timedelta(seconds=grace),
        )
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        session.execute(
            update(Job).where(Job.id == row.id).values(state=JobState.CANCELLED, finished_at=now)
        )
        record_event(
            session,
            row.id,
            JobState.RUNNING,
            JobState.CANCELLED,
            row.attempt,
            {"reason": f"did not stop within {grace:.0f}s of the cancel request; terminated"},
        )
    return [row.id for row in rows]
