"""Flow control: `/v1/limits/{key}` and `POST /v1/queues/{queue}/pause|resume`.

A limit holds the tenant's jobs that name it (`limit_key`): at most `max_running` at
once across every worker and host, starts spaced to `per_second`. A pause holds the
tenant's jobs in a queue (running ones finish) until resumed; it survives restarts.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.auth import current_principal, requires
from api.openapi import JSON_BODY, empty, responses, secured_blueprint
from api.services import services
from conveyor.audit import audit
from conveyor.auth.roles import Permission
from conveyor.ledger.flow import (
    LimitState,
    delete_limit,
    get_limit,
    list_limits,
    pause,
    paused_queues,
    resume,
    set_limit,
)
from conveyor.ledger.requests import LimitKey

limits = secured_blueprint("limits", __name__, "flow-control", "/v1/limits")
queues = secured_blueprint("queue_control", __name__, "flow-control", "/v1/queues")


class LimitBounds(BaseModel):
    """`PUT /v1/limits/{key}`: a running cap, a rate, or both."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": {"max_running": 5, "per_second": 10}}
    )
    max_running: int | None = Field(default=None, ge=1, le=100_000)
    per_second: float | None = Field(default=None, gt=0, le=10_000)

    @model_validator(mode="after")
    def _one_at_least(self) -> LimitBounds:
        if self.max_running is None and self.per_second is None:
            raise ValueError("give max_running, per_second or both")
        return self


class LimitOut(BaseModel):
    """A limit, with the tenant's jobs it holds now."""

    key: str
    max_running: int | None
    per_second: float | None
    running: int = Field(description="Jobs with this key running now.")
    waiting: int = Field(description="Jobs with this key queued and not started yet.")
    updated_at: datetime

    @classmethod
    def of(cls, state: LimitState) -> LimitOut:
        """Build from the ledger's state of a limit."""
        return cls(**state.__dict__)


class LimitList(BaseModel):
    """`GET /v1/limits`."""

    items: list[LimitOut]


class LimitPath(BaseModel):
    """A limit's key in the path."""

    key: LimitKey


class QueuePath(BaseModel):
    """A queue's name in the path."""

    queue: str = Field(min_length=1, max_length=100)


class PauseOut(BaseModel):
    """Whether the caller's jobs in a queue are held."""

    queue: str
    paused: bool


def put_limit(key: str, bounds: LimitBounds) -> LimitState:
    """Create or change the caller's limit `key`, audited."""
    principal = current_principal()
    with services().work.begin() as unit:
        state = set_limit(
            unit,
            principal.tenant_id,
            key,
            max_running=bounds.max_running,
            per_second=bounds.per_second,
            now=datetime.now(UTC),
        )
        audit(unit.session, principal, "limit.set", "limit", key, bounds.model_dump())
    return state


def remove_limit(key: str) -> None:
    """Remove the caller's limit `key`, audited (`NotFound` when it has none)."""
    principal = current_principal()
    with services().work.begin() as unit:
        delete_limit(unit, principal.tenant_id, key)
        audit(unit.session, principal, "limit.delete", "limit", key)


def pause_queue_of_caller(queue: str) -> bool:
    """Hold the caller's tenant's jobs in `queue`, audited; return True (it is paused)."""
    principal = current_principal()
    with services().work.begin() as unit:
        pause(unit, principal.tenant_id, queue)
        audit(unit.session, principal, "queue.pause", "queue", queue)
    return True


def resume_queue_of_caller(queue: str) -> bool:
    """Let the caller's jobs in `queue` start again, audited; return whether it stays paused.

    A deployment-wide pause outlives the tenant's resume.
    """
    principal = current_principal()
    with services().work.begin() as unit:
        resume(unit, principal.tenant_id, queue)
        audit(unit.session, principal, "queue.resume", "queue", queue)
        return queue in paused_queues(unit.session, principal.tenant_id)


@limits.put("/<key>", responses=responses({200: LimitOut}, *JSON_BODY))
@requires(Permission.MANAGE_LIMITS)
def put(path: LimitPath, body: LimitBounds) -> Response:
    """Create or change a limit; jobs that name it wait in the ledger for room."""
    return jsonify(LimitOut.of(put_limit(path.key, body)).model_dump(mode="json"))


@limits.get("", responses=responses({200: LimitList}))
@requires(Permission.READ)
def index() -> Response:
    """List the tenant's limits, with the jobs each holds now."""
    with services().work.reading() as session:
        states = list_limits(session, current_principal().tenant_id)
    return jsonify(items=[LimitOut.of(s).model_dump(mode="json") for s in states])


@limits.get("/<key>", responses=responses({200: LimitOut}, 404, 422))
@requires(Permission.READ)
def show(path: LimitPath) -> Response:
    """Read one limit, with its running and waiting jobs."""
    with services().work.reading() as session:
        state = get_limit(session, current_principal().tenant_id, path.key)
    return jsonify(LimitOut.of(state).model_dump(mode="json"))


@limits.delete("/<key>", responses=responses({204: empty("Removed.")}, 404, 422))
@requires(Permission.MANAGE_LIMITS)
def remove(path: LimitPath) -> tuple[str, int]:
    """Remove a limit: jobs that name it run unlimited."""
    remove_limit(path.key)
    return "", 204


@queues.post("/<queue>/pause", responses=responses({200: PauseOut}, 422))
@requires(Permission.PAUSE_QUEUES)
def pause_queue(path: QueuePath) -> Response:
    """Hold the tenant's jobs in the queue: none starts until resumed (running ones finish)."""
    return jsonify(
        PauseOut(queue=path.queue, paused=pause_queue_of_caller(path.queue)).model_dump()
    )


@queues.post("/<queue>/resume", responses=responses({200: PauseOut}, 422))
@requires(Permission.PAUSE_QUEUES)
def resume_queue(path: QueuePath) -> Response:
    """Let the tenant's jobs in the queue start again (a deployment-wide pause stays)."""
    still = resume_queue_of_caller(path.queue)
    return jsonify(PauseOut(queue=path.queue, paused=still).model_dump())
