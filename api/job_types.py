"""`GET /v1/job-types`: what can be submitted, with each payload's JSON Schema."""

from __future__ import annotations

from flask import Response, jsonify

from api.auth import requires
from api.openapi import responses, secured_blueprint
from api.schemas import JobTypeList
from api.services import services
from conveyor.auth.roles import Permission

bp = secured_blueprint("job_types", __name__, "jobs")


@bp.get("/v1/job-types", responses=responses({200: JobTypeList}))
@requires(Permission.READ)
def index() -> Response:
    """List the job types that can be submitted, with their options and schemas."""
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
            for jt in svc.registry.public()
        ]
    )
