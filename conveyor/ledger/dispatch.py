"""The dispatcher's pass: hand waiting jobs to the broker by turns across tenants, within limits.

A queued job with no `published_at` waits in the ledger for the dispatcher: it was held
back at submit (a limit key, a paused queue, a busy queue), promoted from a delay or a
backoff, sent back by a claim its limit or pause refused, or its publish failed. Each pass
looks at every queue with such jobs and fills the queue's room in the broker (in flight:
published, not claimed yet; the dispatcher says how many fit): each tenant's next jobs by
priority, then submit order, taken one turn at a time across tenants, starting after the
tenant served first last time, so one tenant's backlog never delays another's new jobs by
more than a turn. A job whose limit has no room (its running count, its rate window, and
what is already in flight against it) waits with `waiting_for = "limit"`; a paused
queue's jobs wait with `"pause"`. The claim checks the same again (two dispatchers, a
duplicate message): the dispatcher only keeps the broker from holding what cannot start.
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import TextClause, case, func, select, text, update
from sqlalchemy.engine import RowMapping

from conveyor.ledger.statements import ROW, TYPE_LIMIT_PREFIX
from conveyor.ledger.states import JobState, Waiting
from conveyor.ledger.transitions import queue_messages, show
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job, Limit, QueuePause

NIL = uuid.UUID(int=0)


@dataclass
class Pass:
    """What one dispatcher pass did."""

    published: int = 0
    # The same, per queue.
    by_queue: Counter[str] = field(default_factory=Counter)
    # Jobs it left waiting, by why.
    held: Counter[Waiting] = field(default_factory=Counter)
    # Queues that still have jobs waiting or a full broker: submits wait for the dispatcher.
    busy: set[str] = field(default_factory=set)
    # Per queue, the tenant served first this pass (the next pass starts after it).
    first: dict[str, uuid.UUID] = field(default_factory=dict)


@functools.cache
def _candidates() -> TextClause:
    """Each tenant's next jobs in a queue (by priority, then submit order), turn by turn.

    The tenants come from a loose index scan (one index probe per tenant, not per job),
    so a tenant with 10,000 jobs waiting costs no more than one with ten.
    """
    waiting = "queue = :queue AND state = 'queued' AND published_at IS NULL"
    return text(
        f"""
        WITH RECURSIVE tenants AS (
            (SELECT tenant_id FROM jobs WHERE {waiting} ORDER BY tenant_id LIMIT 1)
            UNION ALL
            SELECT (
                SELECT j.tenant_id FROM jobs j
                WHERE j.{waiting.replace(" AND ", " AND j.")} AND j.tenant_id > t.tenant_id
                ORDER BY j.tenant_id LIMIT 1
            ) FROM tenants t WHERE t.tenant_id IS NOT NULL
        )
        SELECT c.* FROM tenants t CROSS JOIN LATERAL (
            SELECT j.id, j.tenant_id, j.type, j.limit_key, j.waiting_for,
                   row_number() OVER (ORDER BY j.priority DESC, j.created_at, j.id) AS turn
            FROM jobs j
            WHERE j.{waiting.replace(" AND ", " AND j.")} AND j.tenant_id = t.tenant_id
              AND (j.expires_at IS NULL OR j.expires_at > :now)
            ORDER BY j.priority DESC, j.created_at, j.id
            LIMIT :per_tenant
        ) c
        WHERE t.tenant_id IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM queue_pauses p
            WHERE p.queue = :queue AND (p.tenant_id IS NULL OR p.tenant_id = t.tenant_id)
        )
        ORDER BY c.turn, (c.tenant_id <= :after), c.tenant_id
        """  # noqa: S608 - the interpolated text is this function's own
    )


@dataclass
class _Room:
    """What a limit can still take this pass: slots to run in and starts in its window."""

    slots: float
    starts: float

    def admits(self) -> bool:
        return self.slots > 0 and self.starts > 0

    def take(self) -> None:
        self.slots -= 1
        self.starts -= 1


def _gates(tenant_id: uuid.UUID, limit_key: str | None, job_type: str) -> list[tuple[Any, str]]:
    gates: list[tuple[Any, str]] = [(None, TYPE_LIMIT_PREFIX + job_type)]
    if limit_key is not None:
        gates.append((tenant_id, limit_key))
    return gates


def _rooms(
    unit: UnitOfWork, jobs: Iterable[RowMapping], now: datetime
) -> dict[tuple[Any, str], _Room]:
    """Return the room of every limit the jobs count against, minus what is in flight."""
    wanted = {
        gate for job in jobs for gate in _gates(job["tenant_id"], job["limit_key"], job["type"])
    }
    if not wanted:
        return {}
    tenant_gates = [(t, k) for t, k in wanted if t is not None]
    type_keys = [k for t, k in wanted if t is None]
    limits = unit.session.execute(
        select(Limit).where(
            (Limit.tenant_id.is_(None) & Limit.key.in_(type_keys))
            | func.row(Limit.tenant_id, Limit.key).in_(tenant_gates or [(NIL, "")])
        )
    ).scalars()
    in_flight = Job.state == JobState.QUEUED, Job.published_at.is_not(None)
    flying: Counter[tuple[Any, str]] = Counter()
    for tenant_id, key, n in unit.session.execute(
        select(Job.tenant_id, Job.limit_key, func.count())
        .where(*in_flight, func.row(Job.tenant_id, Job.limit_key).in_(tenant_gates or [(NIL, "")]))
        .group_by(Job.tenant_id, Job.limit_key)
    ):
        flying[(tenant_id, str(key))] = n
    for job_type, n in unit.session.execute(
        select(Job.type, func.count())
        .where(*in_flight, Job.type.in_([k.removeprefix(TYPE_LIMIT_PREFIX) for k in type_keys]))
        .group_by(Job.type)
    ):
        flying[(None, TYPE_LIMIT_PREFIX + job_type)] = n
    rooms = {}
    for limit in limits:
        gate = (limit.tenant_id, limit.key)
        slots = float("inf") if limit.max_running is None else limit.max_running - limit.running
        starts = float("inf")
        if limit.per_second is not None:
            capacity = max(1, int(limit.per_second))
            span = timedelta(seconds=capacity / limit.per_second)
            starts = capacity - sum(1 for t in limit.starts if t > now - span)
        rooms[gate] = _Room(slots - flying[gate], starts - flying[gate])
    return rooms


def waiting_queues(unit: UnitOfWork) -> list[str]:
    """Return the queues that have jobs waiting for the dispatcher."""
    return list(
        unit.session.execute(
            select(Job.queue)
            .where(Job.state == JobState.QUEUED, Job.published_at.is_(None))
            .distinct()
        ).scalars()
    )


def dispatch(
    unit: UnitOfWork,
    now: datetime,
    *,
    rooms: dict[str, int],
    per_tenant: int,
    after: dict[str, uuid.UUID],
) -> Pass:
    """Publish the waiting jobs that may start, within each queue's room; return the pass.

    `rooms` says, per queue with jobs waiting, how many more messages the broker should
    hold (the dispatcher's pace; 0 when the broker did not say how many it holds).
    """
    done = Pass()
    for queue, room in rooms.items():
        if room <= 0:
            done.busy.add(queue)
            continue
        _mark_paused(unit, queue, done)
        candidates = (
            unit.session.execute(
                _candidates(),
                {
                    "queue": queue,
                    "now": now,
                    "per_tenant": per_tenant,
                    "after": after.get(queue, NIL),
                },
            )
            .mappings()
            .all()
        )
        limit_rooms = _rooms(unit, candidates, now)
        chosen: list[uuid.UUID] = []
        # Chosen jobs that said why they waited: their views change as they go.
        said: set[uuid.UUID] = set()
        held: list[uuid.UUID] = []
        for job in candidates:
            if len(chosen) >= room:
                break
            gates = [
                limit_rooms[g]
                for g in _gates(job["tenant_id"], job["limit_key"], job["type"])
                if g in limit_rooms
            ]
            if all(gate.admits() for gate in gates):
                for gate in gates:
                    gate.take()
                chosen.append(job["id"])
                if job["waiting_for"] is not None:
                    said.add(job["id"])
                done.first.setdefault(queue, job["tenant_id"])
            elif job["waiting_for"] != Waiting.LIMIT:
                held.append(job["id"])
        sent = _publish(unit, chosen, said, now)
        done.published += sent
        done.by_queue[queue] += sent
        done.held[Waiting.LIMIT] += _hold(unit, held, Waiting.LIMIT)
        # Busy while jobs that could run wait their turn: the room ran out, or some tenant
        # has more waiting than one pass takes. Jobs a limit holds keep no one waiting.
        unserved = len(candidates) > len(chosen) + len(held)
        more = any(job["turn"] >= per_tenant for job in candidates)
        if len(chosen) >= room or unserved or more:
            done.busy.add(queue)
    return done


def _publish(
    unit: UnitOfWork, job_ids: list[uuid.UUID], said: set[uuid.UUID], now: datetime
) -> int:
    """Stamp the chosen jobs published and queue their messages (guarded: once each).

    The views of those that `said` why they waited change (their `waiting_for` clears).
    """
    if not job_ids:
        return 0
    rows = (
        unit.session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.state == JobState.QUEUED, Job.published_at.is_(None))
            .values(
                published_at=now,
                waiting_for=None,
                # The view shows `waiting_for`: it moves only when that was set.
                version=Job.version + case((Job.waiting_for.is_not(None), 1), else_=0),
            )
            .returning(*ROW)
            .execution_options(synchronize_session=False)
        )
        .mappings()
        .all()
    )
    queue_messages(unit, rows)
    show(unit, [row for row in rows if row["id"] in said])
    return len(rows)


def _hold(unit: UnitOfWork, job_ids: list[uuid.UUID], reason: Waiting) -> int:
    """Say why these jobs wait (their views show it)."""
    if not job_ids:
        return 0
    rows = (
        unit.session.execute(
            update(Job)
            .where(
                Job.id.in_(job_ids),
                Job.state == JobState.QUEUED,
                Job.published_at.is_(None),
                Job.waiting_for.is_distinct_from(reason),
            )
            .values(waiting_for=reason, version=Job.version + 1)
            .returning(*ROW)
            .execution_options(synchronize_session=False)
        )
        .mappings()
        .all()
    )
    show(unit, rows)
    return len(rows)


def _mark_paused(unit: UnitOfWork, queue: str, done: Pass) -> None:
    """Say `pause` on the waiting jobs of the tenants (or everyone) the queue is paused for."""
    paused = select(QueuePause.id).where(
        QueuePause.queue == queue,
        QueuePause.tenant_id.is_(None) | (QueuePause.tenant_id == Job.tenant_id),
    )
    rows = (
        unit.session.execute(
            update(Job)
            .where(
                Job.queue == queue,
                Job.state == JobState.QUEUED,
                Job.published_at.is_(None),
                Job.waiting_for.is_distinct_from(Waiting.PAUSE),
                paused.exists(),
            )
            .values(waiting_for=Waiting.PAUSE, version=Job.version + 1)
            .returning(*ROW)
            .execution_options(synchronize_session=False)
        )
        .mappings()
        .all()
    )
    show(unit, rows)
    done.held[Waiting.PAUSE] += len(rows)
