"""Cancel and retry: `/v1/jobs/{id}/cancel`, `/v1/jobs/{id}/retry`, `/v1/jobs/retry`."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Response, jsonify

from api.auth import current_principal, requires
from api.job_views import shown
from api.openapi import JSON_BODY, described, responses, secured_blueprint
from api.requests import parse_id
from api.schemas import BulkRetry, CancelAnswer, JobPath, Retried
from api.services import services
from conveyor.auth.roles import Permission
from conveyor.control import cancel_job, retry_job, retry_matching_jobs
from conveyor.ledger.views import JobOut

bp = secured_blueprint("job_control", __name__, "jobs", "/v1/jobs")


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
        view, outcome = cancel_job(unit, svc.registry, principal, job_id, datetime.now(UTC))
    return jsonify(outcome=outcome, job=shown(view)), 200 if outcome == "cancelled" else 202


@bp.post("/<job_id>/retry", responses=responses({202: JobOut}, 404, 409))
@requires(Permission.RETRY)
def retry(path: JobPath) -> tuple[Response, int]:
    """Run a failed, cancelled or expired job again, with a fresh attempt budget."""
    principal = current_principal()
    svc = services()
    job_id = parse_id(path.job_id, "job")
    with svc.work.begin() as unit:
        view = retry_job(unit, svc.registry, principal, job_id, datetime.now(UTC))
    return jsonify(shown(view)), 202


@bp.post("/retry", responses=responses({200: Retried}, 409, *JSON_BODY))
@requires(Permission.RETRY)
def retry_many(body: BulkRetry) -> Response:
    """Run again every dead job matching the filters (failed ones by default), up to `limit`."""
    principal = current_principal()
    svc = services()
    with svc.work.begin() as unit:
        views = retry_matching_jobs(
            unit,
            svc.registry,
            principal,
            body.filters(),
            datetime.now(UTC),
            limit=body.limit,
            described=body.model_dump(mode="json", exclude_none=True),
        )
    return jsonify(retried=len(views), ids=[view["id"] for view in views])
