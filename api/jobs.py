"""`/v1/jobs`: submit jobs (one, or a batch), list them, read one and its history.

The status poll (`show`) reads its job's live view in the rate limiter's round trip when
the two share a Redis (`api.rate_limits.ride_along`): a poll from a cached API key then
costs one Redis round trip and no database one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Response, jsonify, request, url_for
from flask.blueprints import BlueprintSetupState
from redis.client import Pipeline
from werkzeug.wrappers import Response as ResponseBase

from api.admission import admitting
from api.auth import current_principal, requires
from api.job_views import shown, shown_to_caller
from api.openapi import (
    JSON_BODY,
    LOCATION,
    described,
    responses,
    secured_blueprint,
)
from api.rate_limits import Receiver, ride_along
from api.requests import parse_id
from api.schemas import (
    EventList,
    EventOut,
    JobBatch,
    JobList,
    JobListQuery,
    JobPage,
    JobPath,
    JobWait,
)
from api.services import services
from api.streams import hold
from conveyor.auth.roles import Permission
from conveyor.errors import ValidationFailed
from conveyor.ledger.idempotency import claim_idempotency_key, point_idempotency_key
from conveyor.ledger.reads import job_row, list_events, list_jobs, read_view
from conveyor.ledger.requests import JobRequest
from conveyor.ledger.submit import one_statement, submit_jobs
from conveyor.ledger.views import JobOut, job_view
from conveyor.live.store import Prefetched, queue_read
from conveyor.telemetry.logs import bind_context
from conveyor.telemetry.metrics import JOBS_SUBMITTED

logger = logging.getLogger(__name__)
bp = secured_blueprint("jobs", __name__, "jobs", "/v1/jobs")
IDEMPOTENCY_HEADER = "Idempotency-Key"
# The polled job's live view as the rate limiter's round trip read it, for this request's
# `show` (set only once the request is admitted; forgotten when the request ends).
_polled: ContextVar[Prefetched | None] = ContextVar("polled_live_view", default=None)


def idempotency_key() -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not 1 <= len(key) <= 255:
        raise ValidationFailed(
            "the Idempotency-Key must be 1 to 255 characters",
            errors=[{"field": IDEMPOTENCY_HEADER, "message": "1 to 255 characters"}],
        )
    return key


@bp.post(
    "",
    responses=responses(
        {
            202: described(JobOut, "Accepted: stored, and published to its queue.", LOCATION),
            200: described(
                JobOut,
                "A repeated `Idempotency-Key`, or a `unique_key` a job holds: that job.",
                LOCATION,
            ),
        },
        409,
        *JSON_BODY,
    ),
    openapi_extensions={
        "parameters": [
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "description": "Send the same key again to get the original job, not a new one.",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        ]
    },
)
@requires(Permission.SUBMIT)
def create(body: JobRequest) -> tuple[Response, int, dict[str, str]]:
    """Submit a job: 202, or 200 with the job a repeated Idempotency-Key or unique key names."""
    principal = current_principal()
    key = idempotency_key()
    svc = services()
    now = datetime.now(UTC)
    job_id = uuid.uuid4()
    # An idempotency key is claimed in the submit's transaction; a plain job needs none.
    plain = key is None and one_statement([body])
    with svc.work.single_statement() if plain else svc.work.begin() as unit:
        original = None
        if key is not None:
            original = claim_idempotency_key(
                unit,
                principal.tenant_id,
                key,
                body.fingerprint(),
                job_id,
                now=now,
                retention=timedelta(hours=svc.settings.idempotency_retention_hours),
            )
        if original is not None:
            view = job_view(job_row(unit.session, original, principal.tenant_id))
        else:
            # A replay (above) adds no job: only a new one is held to the tenant's quota.
            (submitted,) = submit_jobs(
                unit,
                svc.registry,
                [body],
                tenant_id=principal.tenant_id,
                default_queue=svc.settings.default_queue,
                gate=svc.gate,
                now=now,
                ids=[job_id],
                admit=admitting(unit, principal.tenant_id),
            )
            view = submitted.view
            if not submitted.created and key is not None:
                # The key now names the job that held the unique key, not one never made.
                point_idempotency_key(unit, principal.tenant_id, key, submitted.id)
    location = {"Location": url_for("jobs.show", job_id=view["id"])}
    bind_context(job_id=view["id"], job_type=view["type"])
    if original is not None or not submitted.created:
        return jsonify(shown(view)), 200, location
    JOBS_SUBMITTED.labels(submitted.type, submitted.queue).inc()
    logger.info("job submitted to queue %s", submitted.queue)
    return jsonify(shown(view)), 202, location


@bp.post("/batch", responses=responses({202: JobList}, *JSON_BODY))
@requires(Permission.SUBMIT)
def create_batch(body: JobBatch) -> tuple[Response, int]:
    """Submit up to 1,000 jobs in one transaction, all or none."""
    principal = current_principal()
    svc = services()
    plain = one_statement(body.jobs)
    with svc.work.single_statement() if plain else svc.work.begin() as unit:
        jobs = submit_jobs(
            unit,
            svc.registry,
            body.jobs,
            tenant_id=principal.tenant_id,
            default_queue=svc.settings.default_queue,
            gate=svc.gate,
            now=datetime.now(UTC),
            admit=admitting(unit, principal.tenant_id),
        )
    created = [job for job in jobs if job.created]
    for (job_type, queue), count in Counter((job.type, job.queue) for job in created).items():
        JOBS_SUBMITTED.labels(job_type, queue).inc(count)
    return jsonify(items=[shown(job.view) for job in jobs]), 202


@bp.get("", responses=responses({200: JobPage}, 422))
@requires(Permission.READ)
def index(query: JobListQuery) -> Response:
    """List jobs, newest first, filtered, a page at a time."""
    principal = current_principal()
    with services().work.reading() as session:
        rows, next_cursor = list_jobs(
            session, principal.tenant_id, query.filters(), limit=query.limit, cursor=query.cursor
        )
    items = [shown(job_view(row)) for row in rows]
    links = {}
    if next_cursor is not None:
        args: dict[str, Any] = {**request.args.to_dict(), "cursor": next_cursor}
        links["next"] = url_for("jobs.index", **args)
    return jsonify(items=items, next_cursor=next_cursor, links=links)


@bp.get(
    "/<job_id>",
    responses=responses(
        {
            200: JobOut,
            304: {
                "description": "Unchanged since the `ETag` sent in `If-None-Match` (with "
                "`?wait=N`: for N seconds)."
            },
        },
        404,
        422,
    ),
)
@requires(Permission.READ)
def show(path: JobPath, query: JobWait) -> ResponseBase:
    """Read a job, with live progress while it runs; `ETag`, 304; `?wait=N` waits for a change."""
    principal = current_principal()
    svc = services()
    job_id = parse_id(path.job_id, "job")
    show_view = shown_to_caller()

    def read(prefetched: Prefetched | None = None) -> Response:
        with svc.work.reading() as session:
            view = read_view(svc.live, session, job_id, principal.tenant_id, prefetched)
        bind_context(job_id=view["id"], job_type=view["type"])
        shown_view = show_view(view)
        response = jsonify(shown_view)
        response.set_etag(etag_of(shown_view))
        return response

    response = read(_take_polled())
    known, _ = response.get_etag()
    if query.wait and known is not None and known in request.if_none_match:
        # The caller has this view: hold the request until it changes or the wait ends.
        changed = hold(svc, job_id, query.wait, lambda: _tagged(read()), known)
        if changed is not None:
            return changed
    return response.make_conditional(request)


def etag_of(view: dict[str, Any]) -> str:
    """Return a job view's ETag: its content, less the ETA that moves with the clock.

    `progress.eta_seconds` is extrapolated at each read: in the ETag it would make every
    read of a running job a change, and a long poll could never wait.
    """
    progress = view.get("progress")
    if progress:
        view = {**view, "progress": {k: v for k, v in progress.items() if k != "eta_seconds"}}
    digest = hashlib.sha1(json.dumps(view, sort_keys=True).encode(), usedforsecurity=False)
    return digest.hexdigest()


def _tagged(response: Response) -> tuple[str, Response]:
    tag, _ = response.get_etag()
    return tag or "", response


def _read_with_the_counters(pipe: Pipeline) -> Receiver | None:
    """Queue the polled job's live-view read on the rate limiter's pipeline."""
    try:
        job_id = uuid.UUID(str((request.view_args or {}).get("job_id")))
    except ValueError:
        return None  # the view answers 404
    queue_read(pipe, job_id)

    def receive(replies: Sequence[Any]) -> None:
        _polled.set(Prefetched(job_id, replies))

    return receive


def _take_polled() -> Prefetched | None:
    """Return the live view read with this poll's counters, if it was, and forget it."""
    prefetched = _polled.get()
    _polled.set(None)
    return prefetched


def _poll_with_the_counters(state: BlueprintSetupState) -> None:
    live = state.app.extensions["conveyor"].live
    ride_along(state.app, f"{state.name}.show", live.redis, _read_with_the_counters)


bp.record_once(_poll_with_the_counters)


@bp.teardown_request
def _forget_polled(_: BaseException | None) -> None:
    # A poll the limiter admitted but a later check refused (its view never ran) must leave
    # nothing for the next request this thread serves.
    _polled.set(None)


@bp.get("/<job_id>/events", responses=responses({200: EventList}, 404))
@requires(Permission.READ)
def events(path: JobPath) -> Response:
    """Read a job's history: every transition, with each attempt's error and timings."""
    principal = current_principal()
    with services().work.reading() as session:
        history = list_events(session, parse_id(path.job_id, "job"), principal.tenant_id)
        return jsonify(items=[EventOut.of(e).model_dump(mode="json") for e in history])
