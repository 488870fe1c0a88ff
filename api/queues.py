"""`GET /v1/queues`: what each queue holds and which workers run what (operators and admins).

Queues and workers are the platform's, shared by every tenant; what the ledger says about
them is the caller's tenant's: its jobs' counts and ids only. The broker's depth alone is
the whole queue's (a broker message carries no tenant).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from flask import Response, jsonify
from pydantic import BaseModel, Field

from api.auth import current_principal, requires
from api.openapi import responses, secured_blueprint
from api.services import Services, services
from conveyor.auth.roles import Permission
from conveyor.ledger.flow import paused_queues
from conveyor.queues import (
    QueueStats,
    WorkerInfo,
    online_workers,
    queue_overview,
    recent_workers,
    tenant_workers,
)

bp = secured_blueprint("queues", __name__, "operations", "/v1/queues")


class QueueOut(BaseModel):
    """One queue: broker depth, the caller's queued and running jobs, their oldest wait."""

    name: str
    depth: int | None = Field(
        description="Messages waiting in the broker: every tenant's (null if it did not answer)."
    )
    queued: int = Field(description="The caller's tenant's jobs queued here.")
    running: int = Field(description="The caller's tenant's jobs running here.")
    oldest_queued_at: datetime | None = Field(
        description="Since when the tenant's oldest queued job here has waited."
    )
    oldest_wait_seconds: float | None
    paused: bool = Field(
        description="The caller's jobs here do not start: its pause, or the deployment's."
    )


class WorkerOut(BaseModel):
    """A worker that answered, with the ids of the caller's tenant's jobs it is running."""

    name: str
    active_job_ids: list[str]


class QueuesOut(BaseModel):
    """`GET /v1/queues`."""

    queues: list[QueueOut]
    workers: list[WorkerOut]
    checked_at: datetime


def read_queues(
    svc: Services, tenant_id: uuid.UUID | None = None, workers_max_age: float | None = None
) -> tuple[list[QueueStats], list[WorkerInfo]]:
    """Return every known queue's stats and the workers that answered a broadcast.

    With `tenant_id`, every row the ledger is asked about is that tenant's: its jobs'
    counts and, among the workers' running ids, its jobs' only. Without, the deployment's
    (`/metrics`, behind the operators' token). With `workers_max_age`, the workers may be
    a broadcast's answer that old (`conveyor.queues.recent_workers`), so nobody waits on one.
    """
    known = {svc.settings.default_queue} | {jt.queue for jt in svc.registry if jt.queue}
    if workers_max_age is None:
        workers = online_workers(svc.publisher.app, svc.settings.inspect_timeout)
    else:
        workers = recent_workers(
            svc.publisher.app, svc.redis, svc.settings.inspect_timeout, workers_max_age
        )
    with svc.sessions() as session:
        queues = queue_overview(session, svc.publisher.app, known, tenant_id)
        if tenant_id is not None:
            workers = tenant_workers(session, workers, tenant_id)
    return queues, workers


@bp.get("", responses=responses({200: QueuesOut}))
@requires(Permission.SEE_QUEUES)
def index() -> Response:
    """Show per-queue depth, oldest waiting job and running jobs, and the live workers."""
    return jsonify(queue_report().model_dump(mode="json"))


def queue_report(workers_max_age: float | None = None) -> QueuesOut:
    """Return the caller's view of every queue (with its pause) and of the live workers."""
    svc = services()
    tenant_id = current_principal().tenant_id
    queues, workers = read_queues(svc, tenant_id, workers_max_age)
    with svc.work.reading() as session:
        paused = paused_queues(session, tenant_id)
    shown = {q.name for q in queues}
    # A paused queue with nothing in it is still worth seeing.
    queues += [QueueStats(name, None, 0, None, 0) for name in sorted(paused.keys() - shown)]
    now = datetime.now(UTC)
    return QueuesOut(
        queues=[
            QueueOut(
                name=q.name,
                depth=q.depth,
                queued=q.queued,
                running=q.running,
                oldest_queued_at=q.oldest_queued_at,
                oldest_wait_seconds=q.oldest_age(now),
                paused=q.name in paused,
            )
            for q in queues
        ],
        workers=[WorkerOut(name=w.name, active_job_ids=w.active_job_ids) for w in workers],
        checked_at=now,
    )
