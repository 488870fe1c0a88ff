"""The moves of one job: claim, finish, cancel and retry, each one guarded statement.

Each function takes the `UnitOfWork` its caller opened, runs the statement
`conveyor.ledger.statements.transition` derives from the state table, and notes on the unit
the live view of every row it moved (and the message of every job it queued). No caller
computes a version or writes a view: that is why these functions exist.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Integer, Select, bindparam, cast, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB

from conveyor.broker.publisher import Message
from conveyor.errors import Conflict
from conveyor.ledger.dependencies import settle
from conveyor.ledger.reads import JobFilter, job_row
from conveyor.ledger.statements import NOW, ROW, claim_statement, param, transition
from conveyor.ledger.states import NOT_STARTED, JobState, Move
from conveyor.ledger.views import JobRow, job_view
from conveyor.ledger.work import UnitOfWork
from conveyor.live.store import LiveView
from conveyor.models import Job
from conveyor.registry import JobRegistry, RetryPolicy

ERROR_MESSAGE_LIMIT = 2000
MAX_BULK_RETRY = 1000
CancelOutcome = Literal["cancelled", "cancel_requested"]
_JOB = Job.id == param("id")
_TENANT = Job.tenant_id == param("tenant_id")


def show(unit: UnitOfWork, rows: Iterable[JobRow]) -> list[dict[str, Any]]:
    """Note the live view of each row a statement returned; return the views."""
    rows = list(rows)
    views = _note(unit, rows)
    # Every move passes here: its dependents and its workflow follow in the same unit, level
    # by level (a loop, not recursion: a chain of 1,000 abandoned jobs is 1,000 levels).
    pending = settle(unit, rows)
    while pending:
        moved = pending.pop()
        _note(unit, moved)
        pending.extend(settle(unit, moved))
    return views


def _note(unit: UnitOfWork, rows: Sequence[JobRow]) -> list[dict[str, Any]]:
    views = []
    for row in rows:
        view = job_view(row)
        views.append(view)
        unit.show([_live_view(row, view)])
    return views


def _live_view(row: JobRow, view: dict[str, Any]) -> LiveView:
    # A transition's row carries its event's id (a stream's `id:`); other writes none.
    return LiveView.of(row["id"], row["version"], row["tenant_id"], view, row.get("event_id"))


def queue_messages(unit: UnitOfWork, rows: Iterable[JobRow], *, redeclare: bool = False) -> None:
    """Publish the queued jobs among `rows` once the unit commits (they are stamped already)."""
    unit.publish(
        (
            Message(
                row["id"],
                row["type"],
                row["queue"],
                row["priority"],
                unit.request_id,
                row.get("trace_context"),
            )
            for row in rows
            if row["state"] == JobState.QUEUED
        ),
        redeclare=redeclare,
    )


class PendingViews:
    """The live views of a claim that PostgreSQL may not have made durable yet.

    A claim commits without waiting for its WAL flush (`conveyor.ledger.statements.
    claim_statement`), so a PostgreSQL crash may forget it. Redis would not forget a view
    written from it: a `running` view at the claim's version would then outrank the view
    of whatever the ledger really does next at that same version (a cancel, the next
    claim), and stream clients would have seen an event that never happened. So the views
    wait here until a later synchronous commit that wrote a row of this claim (its finish,
    or a heartbeat naming its token): WAL is flushed in order, so that commit made the
    claim durable too. Each view is handed out once (a heartbeat thread and the finish may
    race for it).
    """

    def __init__(self, views: Sequence[LiveView] = ()) -> None:
        self._views = list(views)
        self._lock = threading.Lock()

    def take(self) -> list[LiveView]:
        """Return the views, once: later calls return none."""
        with self._lock:
            views, self._views = self._views, []
        return views

    def __bool__(self) -> bool:
        return bool(self._views)


@dataclass(frozen=True)
class ClaimedJob:
    """A job one attempt of one worker now owns."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    type: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    started_at: datetime | None
    worker: str | None
    # When the job fell due (created, or its delay or backoff over): the start of its wait.
    due_at: datetime
    # The workflow it belongs to, which it may add jobs to.
    workflow_id: uuid.UUID | None = None
    workflow_ref: str | None = None
    # Whether other jobs depended on it when it was claimed (its finish settles them).
    has_dependents: bool = False
    # The claim's own id: its finishes and heartbeats are guarded by it (not the attempt
    # number, which a claim PostgreSQL lost gives to the next claim again).
    claim_token: uuid.UUID | None = None
    # The claim's live views, shown once the claim is durable (`PendingViews`).
    pending: PendingViews = dataclasses.field(default_factory=PendingViews, compare=False)

    @classmethod
    def of(cls, row: JobRow, pending: PendingViews | None = None) -> ClaimedJob:
        """Return the attempt a running job's row describes."""
        return cls(
            row["id"],
            row["tenant_id"],
            row["type"],
            row["payload"],
            row["attempt"],
            row["max_attempts"],
            row["started_at"],
            row["worker"],
            row["scheduled_for"] or row["created_at"],
            row.get("workflow_id"),
            row.get("workflow_ref"),
            bool(row.get("has_dependents")),
            row.get("claim_token"),
            pending or PendingViews(),
        )


@functools.cache
def _claim_statement() -> Any:
    return claim_statement()


_FLUSH_WAL = text("SELECT pg_current_xact_id()")


def claim(unit: UnitOfWork, job_id: uuid.UUID, worker: str, now: datetime) -> ClaimedJob | None:
    """Take a queued, unexpired job for one attempt; `None` means there is nothing to run.

    That covers a duplicate or redelivered message, a cancelled job, an expired one (the
    housekeeper marks those `expired`), and a job a pause or a limit holds back: that one
    goes back to waiting for the dispatcher, spending no attempt.

    The claim commits without waiting for its WAL flush: its views travel in the claimed
    job's `pending` and are shown by its first durable write (`PendingViews`). A claim
    never moves a dependent or a workflow, so it has nothing else to settle.
    """
    params = {"p_id": job_id, "p_now": now, "p_worker": worker, "p_detail": {"worker": worker}}
    row = unit.session.execute(_claim_statement(), params).mappings().one_or_none()
    if row is None:
        return None
    if row["from_state"] is None:
        # Sent back to wait (rare: a pause or a full limit). No finish follows to make it
        # durable, so commit a transaction that takes an xid: its synchronous commit
        # flushes the WAL up to it, the send-back's included; then show the view.
        unit.session.execute(_FLUSH_WAL)
        _note(unit, [row])
        return None
    pending = PendingViews([_live_view(row, job_view(row))])
    return ClaimedJob.of(row, pending)


def show_claim(unit: UnitOfWork, job: ClaimedJob) -> None:
    """Show the claim's views once this unit commits; only after a write naming its token."""
    unit.show(job.pending.take())


@functools.cache
def _finish_statement(move: Move, columns: tuple[str, ...], alone: bool = False) -> Select[Any]:
    # The claim that took the job, and only while it runs: a late or duplicate attempt, or
    # the run of a claim PostgreSQL lost, finishes nothing.
    # NULL matches NULL: the reaper and the hard time limit also end attempts claimed
    # before claims had tokens.
    guards = [_JOB, Job.claim_token.is_not_distinct_from(param("claim_token"))]
    if alone:
        # Settling dependents or a workflow takes more statements, which must share the
        # finish's transaction: a statement that runs alone leaves such a job unmoved.
        guards += [Job.has_dependents.is_(False), Job.workflow_id.is_(None)]
    return transition(move, where=guards, values={c: param(c) for c in columns})


def _finish(
    unit: UnitOfWork,
    job: ClaimedJob,
    move: Move,
    now: datetime,
    detail: dict[str, Any] | None,
    alone: bool = False,
    **values: Any,
) -> bool:
    """Make a finishing move of a running attempt; `False` if the attempt lost the job.

    A finish commits synchronously and names the claim's token: once it moved the row, its
    commit made the claim durable, so the claim's views are shown first.
    """
    statement = _finish_statement(move, tuple(sorted(values)), alone)
    params = {f"p_{name}": value for name, value in values.items()}
    params |= {"p_id": job.id, "p_claim_token": job.claim_token, "p_now": now, "p_detail": detail}
    rows = unit.session.execute(statement, params).mappings().all()
    if rows:
        show_claim(unit, job)
    show(unit, rows)
    return bool(rows)


def _timings(job: ClaimedJob, now: datetime) -> dict[str, Any]:
    started = job.started_at
    return {
        "worker": job.worker,
        "started_at": started.isoformat() if started else None,
        "seconds": round((now - started).total_seconds(), 3) if started else None,
    }


def succeed(
    unit: UnitOfWork,
    job: ClaimedJob,
    result: dict[str, Any] | None,
    now: datetime,
    *,
    alone: bool = False,
) -> bool:
    """Finish an attempt as `succeeded` with its result; `False` if it lost the job.

    `alone`: the unit is this one statement (autocommit, `Work.single_statement`), the
    cheap finish of a job that wrote nothing. Then a job with dependents or in a workflow
    is not moved either (`False`): finish it again in a transaction.
    """
    return _finish(unit, job, Move.SUCCEED, now, _timings(job, now), alone, result=result)


def stop(unit: UnitOfWork, job: ClaimedJob, now: datetime) -> bool:
    """Finish an attempt that stopped because someone cancelled it."""
    return _finish(unit, job, Move.STOP, now, _timings(job, now))


def retry_delay(attempt: int, policy: RetryPolicy) -> timedelta:
    """Return an exponential backoff with full jitter for the attempt just failed."""
    ceiling = min(policy.backoff_cap, policy.backoff_base * 2 ** max(0, attempt - 1))
    return timedelta(seconds=random.uniform(0, ceiling))  # noqa: S311 - jitter, not crypto


def fail(
    unit: UnitOfWork,
    job: ClaimedJob,
    error: BaseException,
    now: datetime,
    *,
    policy: RetryPolicy | None = None,
    retryable: bool = True,
    extra_attempt: bool = False,
) -> JobState | None:
    """Finish a failed attempt: `retrying` with a backoff while attempts remain, else `failed`.

    The event keeps the attempt's error, worker and timings; `None` means the attempt no
    longer owned the job. `extra_attempt` grants one attempt beyond the budget (a worker
    that died is usually not the job's fault).
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
    budget = job.max_attempts + 1 if extra_attempt else job.max_attempts
    if retryable and job.attempt < budget:
        move = Move.BACK_OFF
        values["scheduled_for"] = now + retry_delay(job.attempt, policy or RetryPolicy())
        values["published_at"] = None
        if extra_attempt:
            values["max_attempts"] = budget
    else:
        move = Move.FAIL
    if not _finish(unit, job, move, now, detail, **values):
        return None
    return JobState.RETRYING if move == Move.BACK_OFF else JobState.FAILED


@functools.cache
def _cancel_statement() -> Select[Any]:
    return transition(Move.CANCEL, where=[_JOB, _TENANT])


@functools.cache
def _cancel_request_statement() -> Any:
    # Not a transition: a running job is asked to stop, which it notices at its next
    # progress report or heartbeat. Its view shows when, so its version moves.
    return (
        update(Job)
        .where(_JOB, _TENANT, Job.state == JobState.RUNNING)
        .values(
            cancel_requested_at=func.coalesce(Job.cancel_requested_at, NOW),
            version=Job.version + 1,
        )
        .returning(*ROW)
    )


def cancel(
    unit: UnitOfWork,
    registry: JobRegistry,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    now: datetime,
    by: dict[str, Any],
) -> tuple[dict[str, Any], CancelOutcome]:
    """Cancel a job that has not started at once; ask a running one to stop.

    Each attempt is a guarded statement, so a cancel racing a claim or a finish ends in one
    legal history: a job claimed meanwhile is asked to stop instead; a finished one is a
    `Conflict`. A message for a cancelled job that arrives later finds nothing to claim.
    """
    params = {"p_id": job_id, "p_tenant_id": tenant_id, "p_now": now, "p_detail": by}
    for _ in range(3):  # a job moving between two of these statements is read again
        rows = unit.session.execute(_cancel_statement(), params).mappings().all()
        if rows:
            return show(unit, rows)[0], "cancelled"
        state, job_type = _state_and_type(unit, job_id, tenant_id)
        if state == JobState.RUNNING:
            if not registry.get(job_type).cancellable:
                raise Conflict(f"a running {job_type} job cannot be cancelled")
            rows = unit.session.execute(_cancel_request_statement(), params).mappings().all()
            if rows:
                return show(unit, rows)[0], "cancel_requested"
        elif state not in NOT_STARTED:
            break
    raise Conflict(f"a {state} job cannot be cancelled")


def _state_and_type(
    unit: UnitOfWork, job_id: uuid.UUID, tenant_id: uuid.UUID
) -> tuple[JobState, str]:
    row = job_row(unit.session, job_id, tenant_id)
    return JobState(row["state"]), str(row["type"])


def _retry_values() -> dict[str, Any]:
    # A fresh attempt budget, as the job type's policy gives it (a JSON map of type names).
    budget = cast(bindparam("p_budgets", type_=JSONB)[Job.type].astext, Integer)
    return {
        "max_attempts": Job.attempt + func.coalesce(budget, 1),
        "published_at": NOW,
        "scheduled_for": None,
        "expires_at": None,
        "cancel_requested_at": None,
    }


@functools.cache
def _retry_statement() -> Select[Any]:
    return transition(Move.RETRY, where=[_JOB, _TENANT], values=_retry_values())


def _budgets(registry: JobRegistry) -> dict[str, int]:
    return {job_type.name: job_type.retry.max_attempts for job_type in registry}


def retry(
    unit: UnitOfWork,
    registry: JobRegistry,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    now: datetime,
    by: dict[str, Any],
) -> dict[str, Any]:
    """Send a failed, cancelled or expired job back to the queue with a fresh attempt budget."""
    params = {
        "p_id": job_id,
        "p_tenant_id": tenant_id,
        "p_now": now,
        "p_detail": {"retry": by},
        "p_budgets": _budgets(registry),
    }
    rows = unit.session.execute(_retry_statement(), params).mappings().all()
    if not rows:
        state, _ = _state_and_type(unit, job_id, tenant_id)
        raise Conflict(f"a {state} job cannot be retried")
    queue_messages(unit, rows)
    return show(unit, rows)[0]


def retry_matching(
    unit: UnitOfWork,
    registry: JobRegistry,
    tenant_id: uuid.UUID,
    filters: JobFilter,
    now: datetime,
    by: dict[str, Any],
    *,
    limit: int = MAX_BULK_RETRY,
) -> list[dict[str, Any]]:
    """Re-run up to `limit` of the tenant's dead jobs that match `filters` (default: failed)."""
    state = JobState(filters.state or JobState.FAILED)
    if state not in (JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED):
        raise Conflict(f"{state} jobs cannot be retried")
    filters = dataclasses.replace(filters, state=state)

    def pick(chosen: Select[Any]) -> Select[Any]:
        # Oldest first; a job another transaction holds is left for the next bulk retry.
        bounded = filters.apply(chosen).order_by(Job.created_at).limit(min(limit, MAX_BULK_RETRY))
        return bounded.with_for_update(skip_locked=True)

    # Built per call, with the filters' values: rare, and its shape varies with them.
    statement = transition(Move.RETRY, where=[_TENANT], values=_retry_values(), pick=pick)
    params = {
        "p_tenant_id": tenant_id,
        "p_now": now,
        "p_detail": {"retry": by},
        "p_budgets": _budgets(registry),
    }
    rows = unit.session.execute(statement, params).mappings().all()
    queue_messages(unit, rows)
    return show(unit, rows)


def running_attempt(unit: UnitOfWork, job_id: uuid.UUID) -> ClaimedJob | None:
    """Return the job's current attempt, locked, if it is running."""
    row = (
        unit.session.execute(
            select(*ROW).where(Job.id == job_id, Job.state == JobState.RUNNING).with_for_update()
        )
        .mappings()
        .one_or_none()
    )
    return ClaimedJob.of(row) if row is not None else None
