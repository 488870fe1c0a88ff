"""`GET /v1/queues`: what each queue holds and which workers run what (operators and admins).

Queues and workers are the platform's, shared by every tenant: the view shows counts and
job ids, never another tenant's payloads (their jobs stay 404 to this caller).
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Response, jsonify
from pydantic import BaseModel

from api.auth import requires
from api.openapi import responses, secured_blueprint
from api.services import Services, services
from conveyor.queues import QueueStats, WorkerInfo, online_workers, queue_overview
from conveyor.roles import Permission

bp = secured_blueprint("queues", __name__, "operations", "/v1/queues")


class QueueOut(BaseModel):
    """One queue: broker depth, the ledger's queued and running jobs, the oldest wait."""

    name: str
    depth: int | None
    queued: int
    running: int
    oldest_queued_at: datetime | None
    oldest_wait_seconds: float | None


class WorkerOut(BaseModel):
    """A worker that answered, with the ids of the jobs it is running."""

    name: str
    active_job_ids: list[str]


class QueuesOut(BaseModel):
    """`GET /v1/queues`."""

    queues: list[QueueOut]
    workers: list[WorkerOut]
    checked_at: datetime


def read_queues(svc: Services) -> tuple[list[QueueStats], list[WorkerInfo]]:
    """Return every known queue's stats and the workers that answered a broadcast."""
    known = {svc.settings.default_queue} | {jt.queue for jt in svc.registry if jt.queue}
    with svc.sessions() as session:
        queues = queue_overview(session, svc.publisher.app, known)
    return queues, online_workers(svc.publisher.app, svc.settings.inspect_timeout)


@bp.get("", responses=responses({200: QueuesOut}))
@requires(Permission.SEE_QUEUES)
def index() -> Response:
    """Show per-queue depth, oldest waiting job and running jobs, and the live workers."""
    queues, workers = read_queues(services())
    now = datetime.now(UTC)
    body = QueuesOut(
        queues=[
            QueueOut(
                name=q.name,
                depth=q.depth,
                queued=q.queued,
                running=q.running,
                oldest_queued_at=q.oldest_queued_at,
                oldest_wait_seconds=q.oldest_age(now),
            )
            for q in queues
        ],
        workers=[WorkerOut(name=w.name, active_job_ids=w.active_job_ids) for w in workers],
        checked_at=now,
    )
    return jsonify(body.model_dump(mode="json"))
