"""Cancel and retry: `/v1/jobs/{id}/cancel`, `/v1/jobs/{id}/retry`, `/v1/jobs/retry`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Response, jsonify

from api.auth import current_principal, requires
from api.job_views import shown
from api.openapi import JSON_BODY, described, responses, secured_blueprint
from api.requests import parse_id
from api.schemas import BulkRetry, CancelAnswer, JobPath, Retried
from api.services import services
from conveyor.audit import audit
from conveyor.auth.keys import Principal
from conveyor.auth.roles import Permission
from conveyor.ledger import transitions
from conveyor.ledger.views import JobOut

bp = secured_blueprint("job_control", __name__, "jobs", "/v1/jobs")


def actor(principal: Principal) -> dict[str, Any]:
    """Who did it, for the job's history."""
    return {
        "user_id": str(principal.user_id) if principal.user_id else None,
        "api_key_id": str(principal.api_key_id) if principal.api_key_id else None,
    }


@bp.post(
    "/<job_id>/cancel",
    responses=responses(
        {
            200: CancelAnswer,
            202: described(CancelAnswer, "The job is running: it has been asked to stop."),
        },
        404,
        409,
    ),
)
@requires(Permission.CANCEL)
def cancel(path: JobPath) -> tuple[Response, int]:
    """Cancel a waiting job at once (200), or ask a running one to stop (202)."""
    principal = current_principal()
    svc = services()
    job_id = parse_id(path.job_id, "job")
    with svc.work.begin() as unit:
        view, outcome = transitions.cancel(
            unit, svc.registry, principal.tenant_id, job_id, datetime.now(UTC), actor(principal)
        )
        audit(unit.session, principal, "job.cancel", "job", job_id, {"outcome": outcome})
    return jsonify(outcome=outcome, job=shown(view)), 200 if outcome == "cancelled" else 202


@bp.post("/<job_id>/retry", responses=responses({202: JobOut}, 404, 409))
@requires(Permission.RETRY)
def retry(path: JobPath) -> tuple[Response, int]:
    """Run a failed, cancelled or expired job again, with a fresh attempt budget."""
    principal = current_principal()
    svc = services()
    job_id = parse_id(path.job_id, "job")
    with svc.work.begin() as unit:
        view = transitions.retry(
            unit, svc.registry, principal.tenant_id, job_id, datetime.now(UTC), actor(principal)
        )
        audit(unit.session, principal, "job.retry", "job", job_id)
    return jsonify(shown(view)), 202


@bp.post("/retry", responses=responses({200: Retried}, 409, *JSON_BODY))
@requires(Permission.RETRY)
def retry_many(body: BulkRetry) -> Response:
    """Run again every dead job matching the filters (failed ones by default), up to `limit`."""
    principal = current_principal()
    svc = services()
    with svc.work.begin() as unit:
        views = transitions.retry_matching(
            unit,
            svc.registry,
            principal.tenant_id,
            body.filters(),
            datetime.now(UTC),
            actor(principal),
            limit=body.limit,
        )
        filters = body.model_dump(mode="json", exclude_none=True)
        audit(
            unit.session, principal, "job.retry_many", "jobs", "*", {**filters, "count": len(views)}
        )
    return jsonify(retried=len(views), ids=[view["id"] for view in views])
