"""The one place where errors become `application/problem+json` (RFC 9457).

`PROBLEM_TYPES` gives each error of `conveyor.errors` its status, title and type slug; a
class without an entry answers as its nearest listed ancestor. The errors that end a job's
attempt (`JobFailed`, `JobCancelled`, `LostOwnership`) never reach a request and have no
entry: if one ever did, it would answer as the root, an internal error. The database's own
failures are translated into the tree before they answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, json
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from api.requests import request_id
from conveyor.errors import (
    Conflict,
    ConveyorError,
    Forbidden,
    MalformedRequest,
    NotFound,
    PublishFailed,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    StorageQuotaExceeded,
    Unauthorized,
    UnknownJobType,
    UnstorableData,
    UnsupportedMediaType,
    ValidationFailed,
)

logger = logging.getLogger(__name__)
PROBLEM_TYPE_BASE = "https://conveyor.dev/problems/"
# How long a client should wait before retrying while the database is unreachable.
DATABASE_RETRY_AFTER = 5


@dataclass(frozen=True)
class ProblemType:
    """How one kind of error reads over HTTP: its status, title and `type` URL's slug."""

    status: int
    title: str
    slug: str


PROBLEM_TYPES: dict[type[ConveyorError], ProblemType] = {
    ConveyorError: ProblemType(500, "Internal error", "internal"),
    MalformedRequest: ProblemType(400, "Malformed request", "malformed-request"),
    Unauthorized: ProblemType(401, "Unauthorized", "unauthorized"),
    Forbidden: ProblemType(403, "Forbidden", "forbidden"),
    NotFound: ProblemType(404, "Not found", "not-found"),
    Conflict: ProblemType(409, "Conflict", "conflict"),
    StorageQuotaExceeded: ProblemType(413, "Storage quota exceeded", "storage-quota-exceeded"),
    UnsupportedMediaType: ProblemType(415, "Unsupported media type", "unsupported-media-type"),
    ValidationFailed: ProblemType(422, "Validation failed", "validation"),
    UnknownJobType: ProblemType(422, "Unknown job type", "unknown-job-type"),
    UnstorableData: ProblemType(422, "Unstorable data", "unstorable-data"),
    RateLimited: ProblemType(429, "Too many requests", "rate-limited"),
    QuotaExceeded: ProblemType(429, "Quota exceeded", "quota-exceeded"),
    ServiceUnavailable: ProblemType(503, "Service unavailable", "unavailable"),
    PublishFailed: ProblemType(503, "Broker unavailable", "broker-unavailable"),
}


def problem_type(error: type[ConveyorError]) -> ProblemType:
    """Return the problem type of an error class: its own entry, else its nearest ancestor's."""
    for cls in error.__mro__:
        if issubclass(cls, ConveyorError) and cls in PROBLEM_TYPES:
            return PROBLEM_TYPES[cls]
    raise AssertionError("unreachable: ConveyorError itself is listed")


def problem(
    status: int, title: str, detail: str, slug: str, errors: list[dict[str, Any]] | None = None
) -> Response:
    """Build a problem+json response."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request_id(),
    }
    if errors:
        body["errors"] = errors
    return Response(json.dumps(body), status=status, mimetype="application/problem+json")


def problem_of(exc: ConveyorError) -> Response:
    """Build the problem+json response for one of Conveyor's errors, with its headers."""
    kind = problem_type(type(exc))
    response = problem(kind.status, kind.title, exc.detail, kind.slug, exc.errors)
    if kind.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RateLimited | ServiceUnavailable) and exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def init_app(app: Flask) -> None:
    """Map Conveyor's errors, Werkzeug's HTTP errors and anything unexpected to problems."""

    @app.errorhandler(ConveyorError)
    def _conveyor_error(exc: ConveyorError) -> Response:
        if problem_type(type(exc)).status >= 500:
            logger.error("request %s failed: %s", request_id(), exc, exc_info=exc)
        return problem_of(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        slug = (exc.name or "error").lower().replace(" ", "-")
        response = problem(status, exc.name, exc.description or exc.name, slug)
        # Keep what Werkzeug says besides the body, such as `Allow` on a 405.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(DataError)
    def _unstorable(exc: DataError) -> Response:
        # Values PostgreSQL refuses to store, such as NUL characters in text or JSON.
        logger.info("request %s: unstorable data: %s", request_id(), exc.orig)
        return problem_of(
            UnstorableData(
                "the request holds a value the database cannot store (for example a NUL character)"
            )
        )

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    def _database_down(exc: Exception) -> Response:
        # An outage, not a bug: a warning without the traceback, and no SQL to the client.
        logger.warning("request %s: database unavailable: %s", request_id(), exc)
        return problem_of(
            ServiceUnavailable(
                "the database is unavailable; try again", retry_after=DATABASE_RETRY_AFTER
            )
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # Log the traceback with the request id; the client sees neither it nor any SQL.
        logger.error("request %s failed", request_id(), exc_info=exc)
        return problem_of(ConveyorError("an unexpected error occurred; quote the request id"))
