"""Workflows: a named graph of jobs, submitted all or nothing, followed and cancelled together.

A workflow's jobs are ordinary jobs with a `workflow_id` and a `ref`; their `depends_on`
name other refs of the workflow, and become edges of `job_dependencies`
(`conveyor.ledger.dependencies` starts, cancels and revives them). The workflow row
counts its unfinished jobs; the finish that leaves none settles its state: `succeeded`
when every job did, `cancelled` when someone cancelled it, else `failed`. A running job of
the workflow may add jobs to it (`extend_workflow`), committed with its own success.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Select, select, tuple_, update
from sqlalchemy.orm import Session, aliased

from conveyor.errors import Conflict, JobCancelled, NotFound, ValidationFailed
from conveyor.ledger.reads import MAX_PAGE
from conveyor.ledger.requests import MAX_BATCH, JobOptions
from conveyor.ledger.statements import ROW, param, transition
from conveyor.ledger.states import JobState, Move
from conveyor.ledger.submit import Gate, Submitted, submit_jobs
from conveyor.ledger.transitions import ClaimedJob, show
from conveyor.ledger.views import job_view, json_time
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job, JobDependency, Workflow
from conveyor.registry import JobRegistry
from conveyor.tenancy import owned

Ref = str
# The ref a job that fans out gets in the workflow its fan-out creates.
PARENT_REF = "parent"
WorkflowState = Literal["running", "succeeded", "failed", "cancelled"]


class WorkflowJob(JobOptions):
    """One job of a workflow: a ref unique in it, and the refs it depends on."""

    ref: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    depends_on: list[str] = Field(default_factory=list, max_length=MAX_BATCH)


class WorkflowRequest(BaseModel):
    """A workflow to submit: its name and its jobs (1 to 1,000)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "name": "nightly-report",
                "jobs": [
                    {"ref": "a", "type": "system.echo", "payload": {"message": "a"}},
                    {"ref": "b", "type": "system.echo", "payload": {"message": "b"}},
                    {
                        "ref": "report",
                        "type": "system.echo",
                        "payload": {"message": "done"},
                        "depends_on": ["a", "b"],
                    },
                ],
            }
        },
    )

    name: str = Field(min_length=1, max_length=200)
    jobs: list[WorkflowJob] = Field(min_length=1, max_length=MAX_BATCH)

    def fingerprint(self) -> str:
        """Return a hash of the request, to tell an idempotent retry from a different request."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _graph(
    jobs: Sequence[WorkflowJob], known: dict[Ref, uuid.UUID], *, field: str = "jobs"
) -> None:
    """Refuse duplicate refs, unknown refs and cycles, naming them (a 422)."""
    errors: list[dict[str, Any]] = []
    seen: set[Ref] = set()
    for n, job in enumerate(jobs):
        if job.ref in seen or job.ref in known:
            errors.append({"field": f"{field}[{n}].ref", "message": f"ref {job.ref!r} repeats"})
        seen.add(job.ref)
    for n, job in enumerate(jobs):
        unknown = [ref for ref in job.depends_on if ref not in seen and ref not in known]
        if unknown:
            message = f"unknown refs: {', '.join(unknown)}"
            errors.append(
                {"field": f"{field}[{n}].depends_on", "message": message, "unknown": unknown}
            )
    if errors:
        raise ValidationFailed(errors[0]["message"], errors=errors)
    cycle = _cycle(jobs)
    if cycle:
        message = f"the dependencies form a cycle: {' -> '.join(cycle)}"
        raise ValidationFailed(
            message, errors=[{"field": field, "message": message, "cycle": cycle}]
        )


def _cycle(jobs: Sequence[WorkflowJob]) -> list[Ref]:
    """Return one cycle among the new jobs' refs (first ref repeated last), or none."""
    edges = {job.ref: [ref for ref in job.depends_on if ref != job.ref] for job in jobs}
    for job in jobs:
        if job.ref in job.depends_on:
            return [job.ref, job.ref]
    # Iterative depth-first search: 1,000 jobs in a chain must not hit the recursion limit.
    color: dict[Ref, int] = {}
    for start in edges:
        if color.get(start):
            continue
        stack: list[tuple[Ref, int]] = [(start, 0)]
        path: list[Ref] = []
        while stack:
            ref, i = stack.pop()
            if i == 0:
                color[ref] = 1
                path.append(ref)
            nexts = [r for r in edges.get(ref, []) if r in edges]
            if i < len(nexts):
                stack.append((ref, i + 1))
                child = nexts[i]
                if color.get(child) == 1:
                    return [*path[path.index(child) :], child]
                if not color.get(child):
                    stack.append((child, 0))
            else:
                color[ref] = 2
                path.pop()
    return []


def _submit_graph(
    unit: UnitOfWork,
    registry: JobRegistry,
    workflow_id: uuid.UUID,
    jobs: Sequence[WorkflowJob],
    known: dict[Ref, uuid.UUID],
    *,
    tenant_id: uuid.UUID,
    default_queue: str,
    now: datetime,
    gate: Gate | None,
    admit: Callable[[int], None] | None,
) -> list[Submitted]:
    for n, job in enumerate(jobs):
        if job.unique_key is not None:
            message = "a workflow's jobs cannot take unique keys"
            raise ValidationFailed(
                message, errors=[{"field": f"jobs[{n}].unique_key", "message": message}]
            )
    ids = {job.ref: uuid.uuid4() for job in jobs} | known
    return submit_jobs(
        unit,
        registry,
        jobs,
        tenant_id=tenant_id,
        default_queue=default_queue,
        now=now,
        ids=[ids[job.ref] for job in jobs],
        gate=gate,
        admit=admit,
        parents=[[ids[ref] for ref in job.depends_on] for job in jobs],
        workflow=(workflow_id, [job.ref for job in jobs]),
    )


def create_workflow(
    unit: UnitOfWork,
    registry: JobRegistry,
    request: WorkflowRequest,
    *,
    tenant_id: uuid.UUID,
    default_queue: str,
    now: datetime,
    workflow_id: uuid.UUID | None = None,
    gate: Gate | None = None,
    admit: Callable[[int], None] | None = None,
) -> uuid.UUID:
    """Insert a workflow and all its jobs and edges, or nothing; return its id."""
    _graph(request.jobs, {})
    workflow = Workflow(
        id=workflow_id or uuid.uuid4(),
        tenant_id=tenant_id,
        name=request.name,
        total=len(request.jobs),
        unfinished=len(request.jobs),
        created_at=now,
    )
    unit.session.add(workflow)
    unit.session.flush()
    _submit_graph(
        unit,
        registry,
        workflow.id,
        request.jobs,
        {},
        tenant_id=tenant_id,
        default_queue=default_queue,
        now=now,
        gate=gate,
        admit=admit,
    )
    return workflow.id


def extend_workflow(
    unit: UnitOfWork,
    registry: JobRegistry,
    workflow_id: uuid.UUID,
    jobs: Sequence[WorkflowJob],
    *,
    tenant_id: uuid.UUID,
    default_queue: str,
    now: datetime,
    gate: Gate | None = None,
) -> list[Submitted]:
    """Add jobs to a workflow (a running job's fan-out); their refs may name its jobs.

    The caller's transaction is the running job's: the jobs exist only if it succeeds.
    """
    wanted = {ref for job in jobs for ref in job.depends_on}
    known: dict[Ref, uuid.UUID] = {
        str(ref): job_id
        for job_id, ref in unit.session.execute(
            select(Job.id, Job.workflow_ref).where(
                Job.workflow_id == workflow_id, Job.workflow_ref.in_(wanted)
            )
        )
    }
    clash = [
        str(ref)
        for ref in unit.session.scalars(
            select(Job.workflow_ref).where(
                Job.workflow_id == workflow_id, Job.workflow_ref.in_([job.ref for job in jobs])
            )
        )
    ]
    if clash:
        message = f"refs already in the workflow: {', '.join(clash)}"
        raise ValidationFailed(message, errors=[{"field": "jobs", "message": message}])
    _graph(jobs, known)
    cancelled = unit.session.scalar(
        update(Workflow)
        .where(Workflow.id == workflow_id)
        .values(
            total=Workflow.total + len(jobs),
            unfinished=Workflow.unfinished + len(jobs),
            state="running",
            finished_at=None,
        )
        .returning(Workflow.cancel_requested_at)
    )
    if cancelled is not None:
        # Someone cancelled the workflow while this job ran: it stops instead of growing it.
        raise JobCancelled("the workflow was cancelled")
    return _submit_graph(
        unit,
        registry,
        workflow_id,
        jobs,
        known,
        tenant_id=tenant_id,
        default_queue=default_queue,
        now=now,
        gate=gate,
        admit=None,
    )


def _summary(workflow: Workflow) -> dict[str, Any]:
    return {
        "id": str(workflow.id),
        "name": workflow.name,
        "state": workflow.state,
        "total": workflow.total,
        "unfinished": workflow.unfinished,
        "created_at": json_time(workflow.created_at),
        "finished_at": json_time(workflow.finished_at),
        "cancel_requested_at": json_time(workflow.cancel_requested_at),
    }


def workflow_view(session: Session, workflow_id: uuid.UUID, tenant_id: uuid.UUID) -> dict[str, Any]:
    """Return the tenant's workflow with every job, its ref, state and dependencies."""
    workflow = owned(session, Workflow, workflow_id, tenant_id, "workflow")
    rows = (
        session.execute(
            # Jobs submitted together share their time: their refs order them.
            select(*ROW)
            .where(Job.workflow_id == workflow_id)
            .order_by(Job.created_at, Job.workflow_ref)
        )
        .mappings()
        .all()
    )
    parent = aliased(Job)
    depends: dict[uuid.UUID, list[str]] = defaultdict(list)
    for child, parent_id, ref in session.execute(
        select(JobDependency.job_id, parent.id, parent.workflow_ref)
        .join(parent, parent.id == JobDependency.depends_on_id)
        .join(Job, Job.id == JobDependency.job_id)
        .where(Job.workflow_id == workflow_id)
    ):
        depends[child].append(ref or str(parent_id))
    jobs = []
    for row in rows:
        view = job_view(row)
        jobs.append(
            {
                "ref": row["workflow_ref"],
                "depends_on": sorted(depends[row["id"]]),
                "on_dependency_failure": row["on_dependency_failure"] or "cancel",
                **view,
            }
        )
    return {**_summary(workflow), "jobs": jobs}


def workflow_summary(
    session: Session, workflow_id: uuid.UUID, tenant_id: uuid.UUID
) -> dict[str, Any]:
    """Return the tenant's workflow without its jobs (`NotFound` for another tenant's)."""
    return _summary(owned(session, Workflow, workflow_id, tenant_id, "workflow"))


def _encode(workflow: Workflow) -> str:
    raw = f"{workflow.created_at.isoformat()}|{workflow.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def list_workflows(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    state: str | None = None,
    name: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Return a page of the tenant's workflows, newest first, and the next page's cursor."""
    from conveyor.ledger.reads import decode_cursor

    query = select(Workflow).where(Workflow.tenant_id == tenant_id)
    if state is not None:
        query = query.where(Workflow.state == state)
    if name is not None:
        query = query.where(Workflow.name == name)
    if cursor is not None:
        created, last = decode_cursor(cursor)
        query = query.where(tuple_(Workflow.created_at, Workflow.id) < tuple_(created, last))
    size = max(1, min(limit, MAX_PAGE))
    found = session.scalars(
        query.order_by(Workflow.created_at.desc(), Workflow.id.desc()).limit(size + 1)
    ).all()
    page = [_summary(w) for w in found[:size]]
    return page, _encode(found[size - 1]) if len(found) > size else None


@functools.cache
def _cancel_all() -> Select[Any]:
    yours = [Job.workflow_id == param("workflow_id"), Job.tenant_id == param("tenant_id")]
    return transition(Move.CANCEL, where=yours)


def cancel_workflow(
    unit: UnitOfWork,
    tenant_id: uuid.UUID,
    workflow_id: uuid.UUID,
    now: datetime,
    by: dict[str, Any],
) -> None:
    """Cancel every unfinished job of the workflow: waiting ones at once, running ones asked.

    A finished workflow is a `Conflict`.
    """
    workflow = unit.session.scalar(
        select(Workflow)
        .where(Workflow.id == workflow_id, Workflow.tenant_id == tenant_id)
        .with_for_update()
    )
    if workflow is None:
        raise NotFound(f"there is no workflow {workflow_id}")
    if workflow.state != "running":
        raise Conflict(f"a {workflow.state} workflow cannot be cancelled")
    workflow.cancel_requested_at = workflow.cancel_requested_at or now
    unit.session.flush()
    params = {"p_workflow_id": workflow_id, "p_tenant_id": tenant_id, "p_now": now, "p_detail": by}
    show(unit, unit.session.execute(_cancel_all(), params).mappings().all())
    # Running jobs are asked to stop, as a cancel of each would (they notice at progress).
    asked = unit.session.execute(
        update(Job)
        .where(
            Job.workflow_id == workflow_id,
            Job.state == JobState.RUNNING,
            Job.cancel_requested_at.is_(None),
        )
        .values(cancel_requested_at=now, version=Job.version + 1)
        .returning(*ROW)
        .execution_options(synchronize_session=False)
    )
    show(unit, asked.mappings().all())


def parent_results(session: Session, job_id: uuid.UUID) -> dict[str, dict[str, Any]]:
    """Return, by ref (or id), the state and result of each job `job_id` depends on."""
    rows = session.execute(
        select(Job.id, Job.workflow_ref, Job.state, Job.result)
        .join(JobDependency, JobDependency.depends_on_id == Job.id)
        .where(JobDependency.job_id == job_id)
    ).all()
    return {
        row.workflow_ref or str(row.id): {
            "id": str(row.id),
            "state": JobState(row.state).value,
            "result": row.result,
        }
        for row in rows
    }


def workflow_of(session: Session, job_id: uuid.UUID) -> uuid.UUID | None:
    """Return the workflow a job belongs to, if any."""
    found: uuid.UUID | None = session.scalar(select(Job.workflow_id).where(Job.id == job_id))
    return found


def fan_out(
    unit: UnitOfWork,
    registry: JobRegistry,
    job: ClaimedJob,
    jobs: Sequence[WorkflowJob | dict[str, Any]],
    *,
    default_queue: str,
    now: datetime,
    gate: Gate | None = None,
) -> list[Submitted]:
    """Add a running job's new jobs to its workflow, in the transaction of its success.

    A job outside any workflow gets one of its own (named after its type), with itself in
    it as ref `parent`, so its fan-in can depend on it and the whole can be followed; in a
    workflow, `parent` in the new jobs' `depends_on` names it whatever its own ref.
    """
    requests = [WorkflowJob.model_validate(j) if isinstance(j, dict) else j for j in jobs]
    if job.workflow_ref not in (None, PARENT_REF):
        # `parent` names the job that fans out, whatever its ref in its workflow.
        requests = [
            r.model_copy(
                update={
                    "depends_on": [job.workflow_ref if d == PARENT_REF else d for d in r.depends_on]
                }
            )
            for r in requests
        ]
    workflow_id = job.workflow_id
    if workflow_id is None:
        workflow = Workflow(
            tenant_id=job.tenant_id,
            name=job.type,
            total=1,
            unfinished=1,
            created_at=now,
        )
        unit.session.add(workflow)
        unit.session.flush()
        workflow_id = workflow.id
        attached = unit.session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.RUNNING)
            .values(workflow_id=workflow_id, workflow_ref=PARENT_REF, version=Job.version + 1)
            .returning(*ROW)
            .execution_options(synchronize_session=False)
        )
        show(unit, attached.mappings().all())
    return extend_workflow(
        unit,
        registry,
        workflow_id,
        requests,
        tenant_id=job.tenant_id,
        default_queue=default_queue,
        now=now,
        gate=gate,
    )
