"""`/v1/jobs`: submit jobs (one, or a batch), list them, read one and its history."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from werkzeug.wrappers import Response as ResponseBase

from api.auth import authorize
from api.publishing import publish_committed
from api.requests import parse_body, parse_id, parse_query
from api.schemas import EventOut, JobBatch, JobListQuery
from api.services import services
from conveyor.errors import ValidationFailed
from conveyor.logs import bind_context
from conveyor.metrics import JOBS_SUBMITTED
from conveyor.queries import get_job, list_events, list_jobs
from conveyor.roles import Permission
from conveyor.snapshots import read_job_view
from conveyor.submit import JobRequest, claim_idempotency_key, submit_jobs
from conveyor.views import JobOut

logger = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
IDEMPOTENCY_HEADER = "Idempotency-Key"


def _idempotency_key() -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not 1 <= len(key) <= 255:
        raise ValidationFailed(
            "the Idempotency-Key must be 1 to 255 characters",
            errors=[{"field": IDEMPOTENCY_HEADER, "message": "1 to 255 characters"}],
        )
    return key


@bp.post("")
def create() -> tuple[Response, int, dict[str, str]]:
    """Store a job and publish its id: 202, or 200 with the original for a repeated key."""
    principal = authorize(Permission.SUBMIT)
    body = parse_body(JobRequest)
    key = _idempotency_key()
    svc = services()
    now = datetime.now(UTC)
    job_id = uuid.uuid4()
    with svc.sessions.begin() as session:
        original = None
        if key is not None:
            original = claim_idempotency_key(
                session,
                principal.tenant_id,
                key,
                body.fingerprint(),
                job_id,
                now=now,
                retention=timedelta(hours=svc.settings.idempotency_retention_hours),
            )
        if original is not None:
            job = get_job(session, original, principal.tenant_id)
        else:
            (job,) = submit_jobs(
                session,
                svc.registry,
                [body],
                tenant_id=principal.tenant_id,
                default_queue=svc.settings.default_queue,
                now=now,
                ids=[job_id],
            )
    location = {"Location": url_for("jobs.show", job_id=job.id)}
    bind_context(job_id=job.id, job_type=job.type)
    if original is not None:
        return jsonify(JobOut.of(job).model_dump(mode="json")), 200, location
    JOBS_SUBMITTED.labels(job.type, job.queue).inc()
    logger.info("job submitted to queue %s", job.queue)
    publish_committed(svc, [job])
    return jsonify(JobOut.of(job).model_dump(mode="json")), 202, location


@bp.post("/batch")
def create_batch() -> tuple[Response, int]:
    """Store up to 1,000 jobs in one transaction, all or none, and publish them together."""
    principal = authorize(Permission.SUBMIT)
    body = parse_body(JobBatch)
    svc = services()
    with svc.sessions.begin() as session:
        jobs = submit_jobs(
            session,
            svc.registry,
            body.jobs,
            tenant_id=principal.tenant_id,
            default_queue=svc.settings.default_queue,
            now=datetime.now(UTC),
        )
    for job in jobs:
        JOBS_SUBMITTED.labels(job.type, job.queue).inc()
    publish_committed(svc, jobs)
    return jsonify(items=[JobOut.of(job).model_dump(mode="json") for job in jobs]), 202


@bp.get("")
def index() -> Response:
    """List the tenant's jobs, newest first, filtered, a page at a time."""
    principal = authorize(Permission.READ)
    query = parse_query(JobListQuery)
    with services().sessions() as session:
        jobs, next_cursor = list_jobs(
            session, principal.tenant_id, query.filters(), limit=query.limit, cursor=query.cursor
        )
        items = [JobOut.of(job).model_dump(mode="json") for job in jobs]
    links = {}
    if next_cursor is not None:
        args: dict[str, Any] = {**request.args.to_dict(), "cursor": next_cursor}
        links["next"] = url_for("jobs.index", **args)
    return jsonify(items=items, next_cursor=next_cursor, links=links)


@bp.get("/<job_id>")
def show(job_id: str) -> ResponseBase:
    """Return a job with live progress while it runs (from Redis when it can); `ETag`, `304`."""
    principal = authorize(Permission.READ)
    svc = services()
    view = read_job_view(svc.snapshots, svc.reads, parse_id(job_id, "job"), principal.tenant_id)
    bind_context(job_id=view["id"], job_type=view["type"])
    response = jsonify(view)
    response.add_etag()
    return response.make_conditional(request)


@bp.get("/<job_id>/events")
def events(job_id: str) -> Response:
    """Return a job's history: every transition, with each attempt's error and timings."""
    principal = authorize(Permission.READ)
    with services().sessions() as session:
        history = list_events(session, parse_id(job_id, "job"), principal.tenant_id)
        return jsonify(items=[EventOut.of(e).model_dump(mode="json") for e in history])
