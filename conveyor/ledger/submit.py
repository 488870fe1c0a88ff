"""Submitting jobs: batches, unique keys, and the choice between publishing and waiting.

A submit is the ledger's insert: every job and its first event in one statement, its live
view noted on the unit of work, and its message too when it may start at once (written
with `published_at` set: the unit publishes it right after the commit).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Boolean, String, TextClause, bindparam, text

from conveyor.ledger.dependencies import link, lock_parents, plan
from conveyor.ledger.flow import claim_unique_key
from conveyor.ledger.reads import job_row
from conveyor.ledger.requests import MAX_BATCH, JobOptions, JobRequest, invalid_field, job_values
from conveyor.ledger.statements import DISPATCH_CHANNEL
from conveyor.ledger.states import JobState, Waiting
from conveyor.ledger.transitions import queue_messages
from conveyor.ledger.views import job_view
from conveyor.ledger.work import UnitOfWork
from conveyor.live.store import LiveView
from conveyor.registry import JobRegistry
from conveyor.telemetry.tracing import current_trace_context


@dataclass(frozen=True, slots=True)
class Submitted:
    """A job a submit answers with: just inserted, or the one holding its unique key."""

    id: uuid.UUID
    type: str
    queue: str
    state: JobState
    view: dict[str, Any]
    # False when the job already existed (the request's unique key was taken).
    created: bool = True


class Gate(Protocol):
    """Says whether a job may go straight to the broker, or why it waits for the dispatcher."""

    def holds(self, tenant_id: uuid.UUID, queue: str) -> Waiting | None:
        """Return why a job of the tenant in `queue` waits, or None to publish it at once."""


def submit_jobs(
    unit: UnitOfWork,
    registry: JobRegistry,
    requests: Sequence[JobOptions],
    *,
    tenant_id: uuid.UUID,
    default_queue: str,
    now: datetime,
    schedule_id: uuid.UUID | None = None,
    schedule_occurrence: datetime | None = None,
    ids: Sequence[uuid.UUID] | None = None,
    allow_internal: bool = False,
    gate: Gate | None = None,
    admit: Callable[[int], None] | None = None,
    parents: Sequence[Sequence[uuid.UUID]] | None = None,
    workflow: tuple[uuid.UUID, Sequence[str]] | None = None,
) -> list[Submitted]:
    """Validate every request, then insert all the jobs and their first events, or none.

    Internal job types are refused (`UnknownJobType`) unless `allow_internal`, which only
    the platform itself may pass (the ledger inserts webhook deliveries on its own).
    `admit` gets the number of jobs once all are valid, before anything is written, and
    may refuse them by raising (the API holds them to the tenant's quota there).

    A request whose unique key a live job holds gets that job (`created=False`). Scheduled
    jobs wait for the promoter. A queued job goes straight to the broker unless something
    may hold it back: a limit it counts against (its `limit_key`, its type's), or what
    `gate` says (a paused or busy queue); then it waits for the dispatcher, `waiting_for`
    saying why. A job with dependencies (`parents`, per request, ids of this submit's jobs
    or of the tenant's; by default a `JobRequest`'s `depends_on`) waits for them
    (`conveyor.ledger.dependencies`); `workflow` puts the jobs in a workflow, with their
    refs. One published at once is written with `published_at` set already (its
    publish is due now): the unit of work publishes it right after the commit, at no
    further statement, and a publish that fails clears it again for the dispatcher.
    Should the process die between the commit and the publish, the reconciler re-drives
    the job (DESIGN.md, "The ledger").
    """
    if len(requests) > MAX_BATCH:
        raise invalid_field(None, "jobs", f"at most {MAX_BATCH} jobs in one batch")
    batch = len(requests) > 1
    ids = ids or [uuid.uuid4() for _ in requests]
    rows = [
        job_values(
            registry,
            request,
            index=n if batch else None,
            job_id=ids[n],
            tenant_id=tenant_id,
            default_queue=default_queue,
            now=now,
            schedule_id=schedule_id,
            schedule_occurrence=schedule_occurrence,
            allow_internal=allow_internal,
        )
        for n, request in enumerate(requests)
    ]
    if workflow is not None:
        for row, ref in zip(rows, workflow[1], strict=True):
            row["workflow_id"], row["workflow_ref"] = workflow[0], ref
    if parents is None:
        parents = [r.depends_on if isinstance(r, JobRequest) else [] for r in requests]
    edges = []
    if any(parents):
        ours = {row["id"] for row in rows}
        theirs = {parent for wanted in parents for parent in wanted if parent not in ours}
        edges = plan(rows, parents, lock_parents(unit, tenant_id, theirs))
    # The submitting request's (or schedule fire's) span: its jobs' runs join or link to it.
    trace_context = current_trace_context()
    for row in rows:
        row["trace_context"] = trace_context
    holders = _unique_holders(unit, requests, rows, tenant_id, now)
    new = [row for row in rows if row["id"] not in holders]
    if admit is not None and new:
        admit(len(new))
    for row in new:
        if row["state"] == JobState.QUEUED:
            row["waiting_for"] = _held(registry, row, gate)
        row["published_at"] = (
            now if row["state"] == JobState.QUEUED and row["waiting_for"] is None else None
        )
    views: dict[uuid.UUID, Submitted] = {}
    if new:
        # One statement for any number of jobs and their first events: the rows travel as
        # one JSON document that PostgreSQL unpacks (jsonb_populate_recordset). SQLAlchemy's
        # per-row, per-column parameter processing of a multi-row insert cost a quarter of
        # a millisecond a job.
        document = json.dumps([_ledger_values(row) for row in new], separators=(",", ":"))
        # A job left to the dispatcher wakes it once this commits, in the same statement.
        wake = any(row["published_at"] is None and row["state"] == JobState.QUEUED for row in new)
        inserted = {
            job_id: (version, event_id)
            for job_id, version, event_id in unit.session.execute(
                _insert_statement(), {"rows": document, "wake": wake}
            )
        }
        link(unit, edges)
        for row in new:
            view = job_view(row)
            views[row["id"]] = Submitted(row["id"], row["type"], row["queue"], row["state"], view)
            version, event_id = inserted[row["id"]]
            unit.show([LiveView.of(row["id"], version, tenant_id, view, event_id)])
        queue_messages(unit, [row for row in new if row["published_at"] is not None])
    return [_answer(unit, row, holders, views, tenant_id) for row in rows]


def one_statement(requests: Sequence[JobOptions]) -> bool:
    """Return whether submitting `requests` writes nothing but its one insert statement.

    Unique keys and dependencies lock and write rows of their own first, in the same
    transaction; without them the insert (the jobs, their first events, the dispatcher's
    wake-up) is atomic alone and may run in autocommit (`Work.single_statement`), which
    saves the BEGIN and COMMIT round trips. The quota's count, when due, is a read.
    """
    return all(
        r.unique_key is None and not (isinstance(r, JobRequest) and r.depends_on) for r in requests
    )


def _held(registry: JobRegistry, row: dict[str, Any], gate: Gate | None) -> Waiting | None:
    """Return why a queued job must wait for the dispatcher, or None to publish it at once."""
    if row["limit_key"] is not None or registry.get(row["type"]).limit is not None:
        return Waiting.LIMIT
    return gate.holds(row["tenant_id"], row["queue"]) if gate is not None else None


def _unique_holders(
    unit: UnitOfWork,
    requests: Sequence[JobOptions],
    rows: Sequence[dict[str, Any]],
    tenant_id: uuid.UUID,
    now: datetime,
) -> dict[uuid.UUID, uuid.UUID]:
    """Take the unique keys the requests ask for; return, per new job, the job holding its key."""
    holders = {}
    for request, row in zip(requests, rows, strict=True):
        if request.unique_key is None:
            continue
        window = request.unique_for_seconds
        holder = claim_unique_key(
            unit,
            tenant_id,
            row["type"],
            request.unique_key,
            row["id"],
            held_until=now + timedelta(seconds=window) if window else None,
            now=now,
        )
        if holder is not None:
            holders[row["id"]] = holder
    return holders


def _answer(
    unit: UnitOfWork,
    row: dict[str, Any],
    holders: dict[uuid.UUID, uuid.UUID],
    views: dict[uuid.UUID, Submitted],
    tenant_id: uuid.UUID,
) -> Submitted:
    """Return what a submit answers for one request: its new job, or the one holding its key."""
    holder = holders.get(row["id"])
    if holder is None:
        return views[row["id"]]
    if holder in views:  # an earlier request of the same batch took the key
        return dataclasses.replace(views[holder], created=False)
    existing = job_row(unit.session, holder, tenant_id)
    return Submitted(
        existing["id"],
        existing["type"],
        existing["queue"],
        existing["state"],
        job_view(existing),
        False,
    )


def _ledger_values(row: dict[str, Any]) -> dict[str, Any]:
    """Return a row's values as JSON PostgreSQL casts to the columns."""
    return {
        column: value.isoformat()
        if isinstance(value, datetime)
        else str(value)
        if isinstance(value, uuid.UUID)
        else value
        for column, value in ((column, row[column]) for column in _COLUMNS)
    }


# The columns submit writes; the others (the finish's, the worker's) take their defaults.
_COLUMNS = (
    "id",
    "tenant_id",
    "type",
    "queue",
    "state",
    "priority",
    "payload",
    "tags",
    "metadata",
    "callback_url",
    "schedule_id",
    "schedule_occurrence",
    "attempt",
    "max_attempts",
    "scheduled_for",
    "expires_at",
    "created_at",
    "published_at",
    "limit_key",
    "waiting_for",
    "workflow_id",
    "workflow_ref",
    "dependencies_left",
    "has_dependents",
    "on_dependency_failure",
    "trace_context",
)


@functools.cache
def _insert_statement() -> TextClause:
    """Build, once, the statement inserting jobs from a JSON array, and their first events.

    With `wake` true it also notifies the dispatcher (delivered at commit, as
    `wake_dispatcher`'s is), saving that statement's round trip.
    """
    columns = ", ".join(f'"{name}"' for name in _COLUMNS)
    # Each job comes back with its version and first event's id, which its live view carries.
    return text(
        f"""
        WITH inserted AS (
            INSERT INTO jobs ({columns})
            SELECT {columns} FROM jsonb_populate_recordset(NULL::jobs, CAST(:rows AS jsonb))
            RETURNING id, state, version
        ), first_events AS (
            INSERT INTO job_events (job_id, from_state, to_state, attempt)
            SELECT id, NULL, state, 0 FROM inserted
            RETURNING job_id, id
        ), woken AS (
            SELECT pg_notify('{DISPATCH_CHANNEL}', '') WHERE :wake
        )
        SELECT inserted.id, inserted.version, first_events.id
        FROM inserted JOIN first_events ON first_events.job_id = inserted.id
        LEFT JOIN woken ON true
        """  # noqa: S608 - the columns are the model's own names, not input
    ).bindparams(bindparam("rows", type_=String()), bindparam("wake", type_=Boolean()))
