"""The one place where errors become `application/problem+json` (RFC 9457)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, json
from sqlalchemy.exc import DataError
from sqlalchemy.exc import OperationalError as DatabaseError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from api.requests import request_id
from conveyor.errors import ConveyorError, RateLimited

logger = logging.getLogger(__name__)
PROBLEM_TYPE_BASE = "https://conveyor.dev/problems/"


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
    """Build the problem+json response for one of Conveyor's errors."""
    response = problem(exc.status, exc.title, exc.detail, exc.slug, exc.errors)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RateLimited):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def init_app(app: Flask) -> None:
    """Map Conveyor's errors, Werkzeug's HTTP errors and anything unexpected to problems."""

    @app.errorhandler(ConveyorError)
    def _conveyor_error(exc: ConveyorError) -> Response:
        if exc.status >= 500:
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
        return problem(
            422,
            "Unstorable data",
            "the request holds a value the database cannot store (for example a NUL character)",
            "unstorable-data",
        )

    @app.errorhandler(DatabaseError)
    @app.errorhandler(PoolTimeout)
    def _database_down(exc: Exception) -> Response:
        logger.warning("request %s: database unavailable: %s", request_id(), exc)
        response = problem(
            503, "Service unavailable", "the database is unavailable; try again", "unavailable"
        )
        response.headers["Retry-After"] = "5"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # Log the traceback with the request id; the client sees neither it nor any SQL.
        logger.error("request %s failed", request_id(), exc_info=exc)
        return problem(
            500, "Internal error", "an unexpected error occurred; quote the request id", "internal"
        )
