"""`/v1/jobs`: submit a job and poll it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from flask import Blueprint, Response, jsonify, url_for
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from api.auth import authorize
from api.requests import parse_body, parse_id, request_id
from api.schemas import JobOut, SubmitJob
from api.services import services
from conveyor.broker import Message
from conveyor.jobs import get_job, mark_published, submit_job
from conveyor.logs import bind_context
from conveyor.metrics import JOBS_SUBMITTED
from conveyor.progress import read_progress
from conveyor.roles import Permission
from conveyor.states import JobState

logger = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")


@bp.post("")
def create() -> tuple[Response, int, dict[str, str]]:
    """Validate and store a job, then publish its id; 202 with its location."""
    principal = authorize(Permission.SUBMIT)
    body = parse_body(SubmitJob)
    svc = services()
    with svc.sessions.begin() as session:
        job = submit_job(
            session,
            svc.registry,
            tenant_id=principal.tenant_id,
            type_name=body.type,
            payload=body.payload,
            default_queue=svc.settings.default_queue,
        )
    bind_context(job_id=job.id, job_type=job.type)
    JOBS_SUBMITTED.labels(job.type, job.queue).inc()
    logger.info("job submitted to queue %s", job.queue)
    # Commit first, then publish: a worker must never receive an id it cannot see yet.
    try:
        svc.publisher.publish([Message(job.id, job.type, job.queue, request_id())])
    except (BrokerError, RedisError, OSError):
        # The job is durable in the ledger with no published_at; the promoter re-publishes it.
        logger.warning("publish of job %s failed; the promoter will retry", job.id, exc_info=True)
    else:
        try:
            with svc.sessions.begin() as session:
                mark_published(session, [job.id], datetime.now(UTC))
        except SQLAlchemyError:
            # The job is stored and published; at worst the promoter publishes it again.
            logger.warning("could not mark job %s published", job.id, exc_info=True)
    location = url_for("jobs.show", job_id=job.id)
    return jsonify(JobOut.from_job(job).model_dump(mode="json")), 202, {"Location": location}


@bp.get("/<job_id>")
def show(job_id: str) -> Response:
    """Return a job from the ledger, with live progress from the result backend while it runs."""
    principal = authorize(Permission.READ)
    svc = services()
    with svc.sessions() as session:
        job = get_job(session, parse_id(job_id, "job"), principal.tenant_id)
    bind_context(job_id=job.id, job_type=job.type)
    progress = None
    if job.state == JobState.RUNNING:
        try:
            progress = read_progress(svc.redis, job.id)
        except RedisError:
            logger.warning("progress of job %s unavailable", job.id, exc_info=True)
    return jsonify(JobOut.from_job(job, progress).model_dump(mode="json"))
