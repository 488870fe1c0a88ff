"""Dependencies between jobs: a job starts only after every job it depends on succeeded.

A job with unfinished dependencies waits in the ledger: `scheduled` with `waiting_for =
"dependencies"` and `dependencies_left` counting what it still waits for. Every move a
job makes passes through `conveyor.ledger.transitions.show`, which hands the moved rows to
`settle` in the same unit of work, so the finish of a dependency and what it does to its
dependents commit together (a crash between the two cannot lose a release):

- a parent that succeeded counts down its waiting dependents, one set-wise statement per
  batch of parents, however many children; those at zero are promoted to `queued` for the
  dispatcher (its wake-up is sent with the commit);
- a parent that ended `failed`, `cancelled` or `expired` abandons its waiting dependents
  (`cancelled`, with an error naming it), except those that asked to run anyway
  (`on_dependency_failure = "run"`), which count it down as if it had succeeded;
- a parent a person retried brings back to waiting the dependents it abandoned (a
  dependent another dead dependency still holds stays cancelled), and counts itself back
  into the waiting ones that ran anyway;
- each workflow counts its unfinished jobs; the finish that brings it to zero settles the
  workflow's state (`conveyor.ledger.workflows`).

The counts are never recounted on the hot path: a fan-in of 10,000 parents costs one
update of its child per parent, not a rescan of 10,000 edges. The rows this moves are
returned to `show`, which notes their views and settles them in turn (a chain of
abandoned jobs, level by level).
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Select,
    String,
    TextClause,
    any_,
    bindparam,
    cast,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.engine import RowMapping
from sqlalchemy.orm import aliased

from conveyor.errors import Conflict, ValidationFailed
from conveyor.ledger.flow import wake_dispatcher
from conveyor.ledger.statements import ROW, transition
from conveyor.ledger.states import FINISHED, JobState, Move, Waiting
from conveyor.ledger.views import JobRow
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job, JobDependency
from conveyor.webhooks import DELIVER_TYPE, DELIVERY_ATTEMPTS

# The dead ends: a dependency that ends in one of these will never succeed.
DEAD = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
RUN_ANYWAY = "run"
# The error a dependent abandoned by its dependency carries (and a revival looks for).
DEPENDENCY_FAILED = "DependencyFailed"
_PARENTS = bindparam("p_parents", type_=ARRAY(UUID(as_uuid=True)))
_IDS = bindparam("p_ids", type_=ARRAY(UUID(as_uuid=True)))
_WAITING = (Job.state == JobState.SCHEDULED, Job.waiting_for == Waiting.DEPENDENCIES)


def _children_of_parents() -> Any:
    return select(JobDependency.job_id).where(JobDependency.depends_on_id == any_(_PARENTS))


@functools.cache
def _count_statement(step: int, *, run_only: bool) -> TextClause:
    """Count the waiting dependents of `p_parents` down (or up) by their edges to them.

    The children are locked in id order first, so two parents finishing at once, sharing
    children, never deadlock. Returns each child's id, count left and run time.
    """
    only = f"AND j.on_dependency_failure = '{RUN_ANYWAY}'" if run_only else ""
    return text(
        f"""
        WITH edges AS (
            SELECT job_id, count(*) AS n FROM job_dependencies
            WHERE depends_on_id = ANY(:p_parents) GROUP BY job_id
        ), locked AS (
            SELECT j.id FROM jobs j JOIN edges e ON e.job_id = j.id
            WHERE j.state = '{JobState.SCHEDULED}' AND j.waiting_for = '{Waiting.DEPENDENCIES}'
              {only}
            ORDER BY j.id FOR UPDATE OF j
        )
        UPDATE jobs SET dependencies_left = jobs.dependencies_left + {step} * e.n
        FROM edges e, locked l
        WHERE jobs.id = e.job_id AND jobs.id = l.id
        RETURNING jobs.id, jobs.dependencies_left, jobs.scheduled_for
        """  # noqa: S608 - every interpolated value is the ledger's own constant
    ).bindparams(_PARENTS)


@functools.cache
def _release_statement() -> Select[Any]:
    # Promoted for the dispatcher: `published_at` stays NULL until it hands them out.
    return transition(
        Move.PROMOTE,
        where=[Job.id == any_(_IDS), *_WAITING, Job.dependencies_left == 0],
        values={"published_at": None},
    )


@functools.cache
def _to_schedule_statement() -> Any:
    # Released before its run time: the promoter takes it from here.
    return (
        update(Job)
        .where(Job.id == any_(_IDS), *_WAITING, Job.dependencies_left == 0)
        .values(waiting_for=Waiting.SCHEDULE, version=Job.version + 1)
        .returning(*ROW)
    )


@functools.cache
def _abandon_statement() -> Select[Any]:
    parent = aliased(Job)
    # The first dead dependency, by ref in a workflow, else by id.
    named = (
        select(
            literal("dependency ")
            + func.coalesce(parent.workflow_ref, cast(parent.id, String))
            + literal(" ended ")
            + cast(parent.state, String)
        )
        .select_from(JobDependency)
        .join(parent, parent.id == JobDependency.depends_on_id)
        .where(JobDependency.job_id == Job.id, parent.id == any_(_PARENTS))
        .order_by(parent.id)
        .limit(1)
        .scalar_subquery()
    )
    return transition(
        Move.ABANDON,
        where=[
            Job.id.in_(_children_of_parents()),
            Job.waiting_for == Waiting.DEPENDENCIES,
            Job.on_dependency_failure.is_distinct_from(RUN_ANYWAY),
        ],
        values={"error_type": DEPENDENCY_FAILED, "error_message": named},
    )


@functools.cache
def _revive_statement() -> Select[Any]:
    parent = aliased(Job)
    edge = select(JobDependency.job_id).join(parent, parent.id == JobDependency.depends_on_id)
    still_dead = edge.where(JobDependency.job_id == Job.id, parent.state.in_(sorted(DEAD))).exists()
    left = (
        select(func.count())
        .select_from(JobDependency)
        .join(parent, parent.id == JobDependency.depends_on_id)
        .where(JobDependency.job_id == Job.id, parent.state != JobState.SUCCEEDED)
        .scalar_subquery()
    )
    return transition(
        Move.REVIVE,
        where=[
            Job.id.in_(_children_of_parents()),
            Job.error_type == DEPENDENCY_FAILED,
            ~still_dead,
        ],
        values={
            "waiting_for": Waiting.DEPENDENCIES,
            "dependencies_left": left,
            "error_type": None,
            "error_message": None,
        },
    )


def settle(unit: UnitOfWork, rows: Sequence[JobRow]) -> list[list[RowMapping]]:
    """Carry the moves among `rows` to their dependents and workflows; return what moved.

    Rows that did not come from a transition (no `from_state`) are ignored; so is a move
    of a job that has no dependents and no workflow, at no cost but a look at its row.
    """
    moves = [row for row in rows if row.get("from_state") is not None]
    if not moves:
        return []
    ended = [row for row in moves if JobState(row["state"]) in FINISHED]
    reopened = [
        row
        for row in moves
        if JobState(row["from_state"]) in FINISHED and JobState(row["state"]) not in FINISHED
    ]
    moved: list[list[RowMapping]] = []
    now = next((row["finished_at"] for row in ended if row["finished_at"]), None)
    now = now or datetime.now(UTC)
    succeeded = _parents(ended, {JobState.SUCCEEDED})
    dead = _parents(ended, DEAD)
    if succeeded or dead:
        counted = _count(unit, succeeded, -1, run_only=False)
        counted += _count(unit, dead, -1, run_only=True)
        moved += _release(unit, counted, now)
    if dead:
        moved.append(_execute(unit, _abandon_statement(), dead, now, {"dependencies": dead}))
    back = [str(row["id"]) for row in reopened if row["has_dependents"]]
    if back:
        _count(unit, back, 1, run_only=False)
        moved.append(_execute(unit, _revive_statement(), back, now, {"revived_by": back}))
    _count_workflows(unit, ended, reopened, now)
    return [batch for batch in moved if batch]


def _parents(rows: Iterable[JobRow], states: Iterable[JobState]) -> list[str]:
    wanted = set(states)
    return [str(row["id"]) for row in rows if row["has_dependents"] and row["state"] in wanted]


def _count(unit: UnitOfWork, parents: list[str], step: int, *, run_only: bool) -> list[RowMapping]:
    """Count the parents' waiting dependents down (`step` -1) or back up (1); return them."""
    if not parents:
        return []
    statement = _count_statement(step, run_only=run_only)
    return list(unit.session.execute(statement, {"p_parents": parents}).mappings())


def _release(unit: UnitOfWork, counted: list[RowMapping], now: datetime) -> list[list[RowMapping]]:
    """Queue the counted dependents that wait for nothing more (or hand them to the promoter)."""
    ready = [row for row in counted if row["dependencies_left"] == 0]
    if not ready:
        return []
    due = [str(r["id"]) for r in ready if r["scheduled_for"] is None or r["scheduled_for"] <= now]
    later = [str(r["id"]) for r in ready if str(r["id"]) not in set(due)]
    moved = []
    if due:
        params = {"p_ids": due, "p_now": now, "p_detail": {"released": True}}
        moved.append(list(unit.session.execute(_release_statement(), params).mappings()))
        wake_dispatcher(unit)
    if later:
        rows = unit.session.execute(_to_schedule_statement(), {"p_ids": later}).mappings()
        moved.append(list(rows))
    return moved


def _execute(
    unit: UnitOfWork, statement: Any, parents: list[str], now: datetime, detail: dict[str, Any]
) -> list[RowMapping]:
    params = {"p_parents": parents, "p_now": now, "p_detail": detail}
    return list(unit.session.execute(statement, params).mappings())


_WORKFLOW_COUNTS = text(
    """
    WITH d AS (
        SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:deltas AS int[])) AS d(id, delta)
    ), locked AS (
        SELECT w.id FROM workflows w JOIN d ON d.id = w.id ORDER BY w.id FOR UPDATE OF w
    )
    UPDATE workflows w SET unfinished = w.unfinished + d.delta,
        state = CASE WHEN d.delta > 0 THEN 'running' ELSE w.state END,
        finished_at = CASE WHEN d.delta > 0 THEN NULL ELSE w.finished_at END
    FROM d, locked l WHERE w.id = d.id AND w.id = l.id
    RETURNING w.id, w.unfinished
    """
)
# The finish that leaves none unfinished settles the workflow's state, once.
_WORKFLOW_ENDS = text(
    """
    UPDATE workflows w SET finished_at = :now, state = CASE
        WHEN NOT EXISTS (
            SELECT 1 FROM jobs j WHERE j.workflow_id = w.id AND j.state <> 'succeeded'
        ) THEN 'succeeded'
        WHEN w.cancel_requested_at IS NOT NULL THEN 'cancelled'
        ELSE 'failed' END
    WHERE w.id = ANY(CAST(:ids AS uuid[])) AND w.unfinished = 0 AND w.state = 'running'
    RETURNING w.id, w.tenant_id, w.state
    """
)
# The ended workflows' deliveries, one per enabled webhook listening for `workflow.<state>`,
# inserted with the finish that ended them (as a job's are: `statements._deliveries`).
_WORKFLOW_DELIVERIES = text(
    f"""
    WITH targets AS (
        SELECT w.id AS workflow_id, w.tenant_id, h.id AS webhook_id, h.url,
               'workflow.' || w.state AS event, q.queue
        FROM workflows w
        JOIN unnest(CAST(:ids AS uuid[]), CAST(:queues AS text[])) AS q(id, queue) ON q.id = w.id
        JOIN webhooks h ON h.tenant_id = w.tenant_id AND h.enabled
            AND ('workflow.' || w.state) = ANY(h.events)
        WHERE w.state IN ('succeeded', 'failed')
    ), inserted AS (
        INSERT INTO jobs (id, tenant_id, type, queue, state, payload, tags, metadata,
                          max_attempts, scheduled_for, created_at)
        SELECT gen_random_uuid(), tenant_id, '{DELIVER_TYPE}', queue, '{JobState.SCHEDULED}',
               jsonb_build_object('workflow_id', workflow_id, 'event', event, 'url', url,
                                  'webhook_id', webhook_id),
               '{{}}', '{{}}', {DELIVERY_ATTEMPTS}, :now, :now
        FROM targets
        RETURNING id, state, attempt
    )
    INSERT INTO job_events (job_id, from_state, to_state, attempt)
    SELECT id, NULL, state, attempt FROM inserted
    """  # noqa: S608 - every interpolated value is the platform's own constant
)


def _count_workflows(
    unit: UnitOfWork, ended: Sequence[JobRow], reopened: Sequence[JobRow], now: datetime
) -> None:
    """Count the workflows' unfinished jobs down (and up again); settle those at zero."""
    deltas: Counter[str] = Counter()
    for rows, step in ((ended, -1), (reopened, 1)):
        for row in rows:
            if row["workflow_id"] is not None:
                deltas[str(row["workflow_id"])] += step
    deltas = Counter({key: n for key, n in deltas.items() if n})
    if not deltas:
        return
    ids = sorted(deltas)
    counted = unit.session.execute(
        _WORKFLOW_COUNTS, {"ids": ids, "deltas": [deltas[i] for i in ids]}
    ).all()
    done = [str(row.id) for row in counted if row.unfinished == 0]
    if done:
        ends = unit.session.execute(_WORKFLOW_ENDS, {"ids": done, "now": now}).all()
        if ends:
            # Deliveries go to the queue of the job whose finish ended the workflow.
            queues = {str(row["workflow_id"]): row["queue"] for row in ended if row["workflow_id"]}
            ids = [str(row.id) for row in ends]
            params = {"ids": ids, "queues": [queues.get(i, "default") for i in ids], "now": now}
            unit.session.execute(_WORKFLOW_DELIVERIES, params)


def lock_parents(
    unit: UnitOfWork,
    tenant_id: uuid.UUID,
    parent_ids: Iterable[uuid.UUID],
) -> dict[uuid.UUID, RowMapping]:
    """Mark the tenant's jobs as depended on, locked, and return them with their states.

    The lock is what keeps a new dependent from missing its parent's finish: a parent
    finishing meanwhile waits for this transaction to commit, and then sees the new edges.
    An id that is not the tenant's job is a validation error that names it.
    """
    wanted = sorted(set(parent_ids))
    if not wanted:
        return {}
    rows = unit.session.execute(
        update(Job)
        .where(Job.id.in_(wanted), Job.tenant_id == tenant_id)
        .values(has_dependents=True)
        .returning(Job.id, Job.state, Job.workflow_id, Job.workflow_ref)
        .execution_options(synchronize_session=False)
    ).mappings()
    found = {row["id"]: row for row in rows}
    missing = [str(job_id) for job_id in wanted if job_id not in found]
    if missing:
        message = f"unknown dependencies: {', '.join(missing)}"
        raise ValidationFailed(
            message, errors=[{"field": "depends_on", "message": message, "unknown": missing}]
        )
    return found


def plan(
    rows: Sequence[dict[str, Any]],
    parents: Sequence[Sequence[uuid.UUID]],
    existing: dict[uuid.UUID, RowMapping],
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Set each new job's wait from its parents' states; return the edges to insert.

    New parents (of the same submit) count as unfinished. A dead existing parent is a
    `Conflict` unless the job runs anyway; a succeeded one is not waited for.
    """
    new = {row["id"]: row for row in rows}
    edges = []
    for row, wanted in zip(rows, parents, strict=True):
        left = 0
        for parent_id in dict.fromkeys(wanted):
            edges.append((parent_id, row["id"]))
            if parent_id in new:
                new[parent_id]["has_dependents"] = True
                left += 1
                continue
            state = JobState(existing[parent_id]["state"])
            if state in DEAD and row["on_dependency_failure"] != RUN_ANYWAY:
                raise Conflict(f"dependency {parent_id} is {state}: the job could never run")
            left += state not in FINISHED
        row["dependencies_left"] = left
        if left:
            row["state"] = JobState.SCHEDULED
            row["waiting_for"] = Waiting.DEPENDENCIES
    return edges


def link(unit: UnitOfWork, edges: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> None:
    """Insert the dependency edges of jobs just inserted (one statement)."""
    if not edges:
        return
    unit.session.execute(
        text(
            "INSERT INTO job_dependencies (depends_on_id, job_id) "
            "SELECT * FROM unnest(CAST(:parents AS uuid[]), CAST(:children AS uuid[]))"
        ),
        {"parents": [str(p) for p, _ in edges], "children": [str(c) for _, c in edges]},
    )


def parents_of(unit: UnitOfWork, job_id: uuid.UUID) -> list[RowMapping]:
    """Return the jobs `job_id` depends on: id, ref, state and result."""
    return list(
        unit.session.execute(
            select(Job.id, Job.workflow_ref, Job.state, Job.result, Job.type)
            .join(JobDependency, JobDependency.depends_on_id == Job.id)
            .where(JobDependency.job_id == job_id)
            .order_by(Job.created_at, Job.id)
        ).mappings()
    )


def edges_of(unit: UnitOfWork, job_ids: Sequence[uuid.UUID]) -> Counter[Any]:
    """Return, per job, how many dependencies it has (for views of a workflow)."""
    counts: Counter[Any] = Counter()
    for job_id, n in unit.session.execute(
        select(JobDependency.job_id, func.count())
        .where(JobDependency.job_id.in_(job_ids))
        .group_by(JobDependency.job_id)
    ):
        counts[job_id] = n
    return counts
