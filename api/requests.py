"""Per-request plumbing: request ids and strict JSON bodies parsed into Pydantic models."""

from __future__ import annotations

import re
import uuid
from typing import TypeVar

from flask import Flask, Response, g, request
from pydantic import BaseModel, ValidationError

from conveyor.errors import MalformedRequest, NotFound, UnsupportedMediaType, ValidationFailed
from conveyor.logs import bind_context, clear_context

M = TypeVar("M", bound=BaseModel)
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


def parse_body(model: type[M]) -> M:
    """Parse the JSON body into `model`, raising a 4xx that names what is wrong."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("send the body as application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # absurdly deep nesting, within the size limit
        body = None
    if body is None:
        raise MalformedRequest("the body is not valid JSON")
    return _validate(model, body, "the request body is not valid")


def parse_query(model: type[M]) -> M:
    """Parse the query string into `model`, raising a 422 that names each wrong parameter."""
    return _validate(model, request.args.to_dict(), "the query parameters are not valid")


def _validate(model: type[M], data: object, detail: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        raise ValidationFailed(detail, errors=errors) from exc


def parse_id(raw: str, what: str) -> uuid.UUID:
    """Parse an id from the URL; a malformed one is simply an object that does not exist."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"there is no {what} {raw}") from None
