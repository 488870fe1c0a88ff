"""Per-request plumbing: request ids, strict JSON bodies, ids in paths."""

from __future__ import annotations

import functools
import inspect
import re
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, request

from conveyor.errors import MalformedRequest, NotFound, UnsupportedMediaType, ValidationFailed
from conveyor.nesting import MAX_JSON_DEPTH, render_path, too_deep
from conveyor.telemetry.logs import bind_context, clear_context

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def init_app(app: Flask) -> None:
    """Give every request an id: the caller's if well-formed, else a new one."""

    @app.before_request
    def _bind_request_id() -> None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        # Every log line of this request carries its id (and later its tenant and job).
        clear_context()
        bind_context(request_id=g.request_id)

    @app.after_request
    def _return_request_id(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = request_id()
        return response

    @app.teardown_request
    def _forget_request(_: BaseException | None) -> None:
        clear_context()


def request_id() -> str:
    """Return the current request's id."""
    return str(g.get("request_id", ""))


def init_body_checks(app: Flask) -> None:
    """Refuse, before validation, a body that a view with a `body` model cannot parse."""

    @app.before_request
    def _json_only() -> None:
        view = app.view_functions.get(request.endpoint or "")
        if view is not None and _takes_body(view):
            json_object()


@functools.cache
def _takes_body(view: Callable[..., Any]) -> bool:
    # flask-openapi3 validates a view's `body` argument; its wrapper keeps the signature.
    return "body" in inspect.signature(view).parameters


def json_object() -> dict[str, Any]:
    """Return the request's JSON object, raising 415, 400 or 422 for anything else.

    Every view with a `body` comes through here before its model validates it, so this is
    where a body nested past `MAX_JSON_DEPTH` is refused, naming where (a 422).
    """
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("send the body as application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError as exc:  # too deep for the parser itself: too deep for us
        raise _too_deep("body") from exc
    if body is None:
        raise MalformedRequest("the body is not valid JSON")
    if not isinstance(body, dict):
        raise ValidationFailed(
            "the body must be a JSON object",
            errors=[{"field": "body", "message": "must be a JSON object"}],
        )
    path = too_deep(body)
    if path is not None:
        raise _too_deep(render_path(path))
    return body


def _too_deep(field: str) -> ValidationFailed:
    message = f"nested deeper than {MAX_JSON_DEPTH} levels"
    return ValidationFailed(f"the body is {message}", errors=[{"field": field, "message": message}])


def parse_id(raw: str, what: str) -> uuid.UUID:
    """Parse an id from the URL; a malformed one is simply an object that does not exist."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"there is no {what} {raw}") from None
