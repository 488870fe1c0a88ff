"""`GET /v1/job-types`: what can be submitted, with each payload's JSON Schema."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.auth import authorize
from api.services import services
from conveyor.roles import Permission

bp = Blueprint("job_types", __name__)


@bp.get("/v1/job-types")
def index() -> Response:
    """List the registered job types with their options and schemas."""
    authorize(Permission.READ)
    svc = services()
    return jsonify(
        items=[
            {
                "name": jt.name,
                "queues": list(jt.queues(svc.settings.default_queue)),
                "priority": jt.priority,
                "max_attempts": jt.retry.max_attempts,
                "soft_time_limit": jt.soft_time_limit,
                "time_limit": jt.time_limit or svc.settings.default_time_limit,
                "cancellable": jt.cancellable,
                "payload_schema": jt.payload_model.model_json_schema(),
                "result_schema": jt.result_model.model_json_schema() if jt.result_model else None,
            }
            for jt in svc.registry
        ]
    )
