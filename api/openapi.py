"""OpenAPI 3.1 from the Pydantic models: the shared parts of every operation, and the docs.

Every route is declared on a flask-openapi3 `APIBlueprint` with a summary, its request
models (`body`, `query` and `path` arguments, validated before the view runs), its
response models and the problems it can answer; `responses()` builds that last part.
`/openapi.json` serves the document and `/docs` a Swagger UI whose assets come from the
flask-openapi3-swagger package, so the page works with no network.

Models give their example as `json_schema_extra={"example": …}`: flask-openapi3's Schema
model keeps OpenAPI's `example` and drops JSON Schema's `examples`.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, Literal

import flask_openapi3_swagger
from flask import Blueprint, Flask, Response, current_app, jsonify, send_from_directory
from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.models.info import Info
from flask_openapi3.models.tag import Tag
from flask_openapi3.openapi import OpenAPI
from flask_openapi3.types import ResponseDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic.json_schema import (
    DEFAULT_REF_TEMPLATE,
    GenerateJsonSchema,
    JsonSchemaMode,
)

from api.errors import problem_of
from conveyor.errors import ValidationFailed

PROBLEM_MEDIA_TYPE = "application/problem+json"
SCHEMAS = "#/components/schemas/"
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`cvk_…`) or an access token from `POST /v1/auth/login`.",
    }
}
# What each problem status means here, as its description in the document.
PROBLEMS = {
    400: "The body is not valid JSON.",
    401: "No credentials, or credentials that are invalid, expired or revoked.",
    403: "The caller's role does not allow this.",
    404: "No such object in the caller's tenant.",
    405: "The path does not accept this method.",
    409: "The request conflicts with the object's current state (or reuses an "
    "`Idempotency-Key` for another request).",
    413: "The body is larger than the limit, or an upload would pass the storage quota.",
    415: "The body is not of the required content type.",
    422: "The request is well-formed but not valid; `errors` names each wrong field.",
    429: "Too many requests, or too many unfinished jobs: retry after `Retry-After` seconds.",
    500: "An unexpected error; quote the `request_id`.",
    503: "A dependency is down: retry after `Retry-After` seconds.",
}
LOCATION = {"Location": {"description": "The new object's URL.", "schema": {"type": "string"}}}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 0},
    }
}
# Every request with a JSON body can fail these ways before the view runs.
JSON_BODY = (400, 413, 415, 422)
# Every authenticated request can fail these ways.
AUTHENTICATED = (401, 403, 429, 503)
# Swagger UI's bundle adds one <style> element of its own: allowed by its hash alone (the
# browser test fails if a new bundle changes it).
SWAGGER_STYLE_HASH = "'sha256-RL3ie0nH+Lzz2YNqQN83mnU0J1ot4QL7b99vMdIX99w='"
DOCS_CSP = (
    f"default-src 'none'; script-src 'self'; style-src 'self' {SWAGGER_STYLE_HASH}; "
    "img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_SWAGGER_ASSETS = Path(flask_openapi3_swagger.__file__).parent / "templates" / "swagger"
_DOCS_ASSETS = Path(__file__).parent / "docs"

# A path segment that names an object; anything else is simply an object that does not
# exist (404), so the schema says uuid and the view parses it.
ObjectId = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]
# Each query model's JSON Schema with pydantic's default arguments, built once (QueryModel).
_QUERY_SCHEMAS: dict[type[BaseModel], dict[str, Any]] = {}


class QueryModel(BaseModel):
    """A query-string model whose default JSON Schema is built once per class, not per request.

    flask-openapi3 reads a query model's `model_json_schema()` on every request to tell
    list parameters from scalars; building it took ~0.6 ms of a 2.5 ms status poll. The
    schema of a class never changes, so the default one is kept; callers only read it.
    """

    @classmethod
    def model_json_schema(
        cls,
        by_alias: bool | None = None,
        ref_template: str = DEFAULT_REF_TEMPLATE,
        schema_generator: type[GenerateJsonSchema] = GenerateJsonSchema,
        mode: JsonSchemaMode = "validation",
        *,
        union_format: Literal["any_of", "primitive_type_array"] = "any_of",
    ) -> dict[str, Any]:
        """Return the model's JSON Schema; the default-argument one from a per-class cache."""
        default = (
            by_alias is None
            and ref_template == DEFAULT_REF_TEMPLATE
            and schema_generator is GenerateJsonSchema
            and mode == "validation"
            and union_format == "any_of"
        )
        if default and cls in _QUERY_SCHEMAS:
            return _QUERY_SCHEMAS[cls]
        schema = super().model_json_schema(
            by_alias, ref_template, schema_generator, mode, union_format=union_format
        )
        if default:
            _QUERY_SCHEMAS[cls] = schema
        return schema


class FieldError(BaseModel):
    """One wrong field of a request."""

    field: str = Field(examples=["payload.seconds"])
    message: str = Field(examples=["Input should be less than or equal to 3600"])


class Problem(BaseModel):
    """An error, as RFC 9457 problem details."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "type": "https://conveyor.dev/problems/validation",
                "title": "Validation failed",
                "status": 422,
                "detail": "the request is not valid",
                "errors": [{"field": "payload.seconds", "message": "Input should be ≤ 3600"}],
                "request_id": "3f0c9a5e2b7d4c1e9f8a6b5c4d3e2f1a",
            }
        }
    )
    type: str
    title: str
    status: int
    detail: str
    request_id: str
    errors: list[FieldError] | None = None


# The document's sections, in the order Swagger UI shows them.
TAGS = {
    "health": "Probes for orchestrators.",
    "auth": "Sign up, sign in, and renew or revoke tokens.",
    "users": "A tenant's people and their roles.",
    "api-keys": "Keys for services; each secret is shown once.",
    "jobs": "Submit jobs and follow them to their end.",
    "workflows": "Graphs of jobs: dependencies, fan-out and fan-in.",
    "schedules": "Recurring jobs, by cron expression or interval.",
    "files": "CSV files in for jobs, and the files jobs produce.",
    "webhooks": "Signed HTTP callbacks on job events.",
    "operations": "Queues and workers, for operators.",
    "flow-control": "Limits on how many jobs run and how often they start; paused queues.",
    "audit": "Who did what, and when.",
}


def tag(name: str, description: str | None = None) -> list[Tag]:
    """Return a blueprint's tag list (a domain's own tag gives its description)."""
    return [Tag(name=name, description=description or TAGS[name])]


def secured_blueprint(
    name: str,
    import_name: str,
    section: str,
    url_prefix: str | None = None,
    description: str | None = None,
) -> APIBlueprint:
    """Return a blueprint whose every operation needs a bearer credential."""
    return APIBlueprint(
        name,
        import_name,
        url_prefix=url_prefix,
        abp_tags=tag(section, description),
        abp_security=BEARER,
        abp_responses=responses({}, *AUTHENTICATED),
    )


def problems(*statuses: int) -> ResponseDict:
    """Document problem+json answers for `statuses`."""
    documented: ResponseDict = {}
    for status in statuses:
        answer: dict[str, Any] = {
            "description": PROBLEMS[status],
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": f"{SCHEMAS}Problem"}}},
        }
        if status in (429, 503):
            answer["headers"] = RETRY_AFTER
        documented[status] = answer
    return documented


def responses(ok: ResponseDict, *errors: int) -> ResponseDict:
    """Document an operation's successful answers and the problems it can answer."""
    documented: ResponseDict = {**ok}
    documented.update(problems(*errors))
    return documented


def described(
    model: type[BaseModel], description: str, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Document an answer of `model` with its own description and headers.

    The model's schema must also be the plain answer of some operation, which is what puts
    it into the document's components.
    """
    documented: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"{SCHEMAS}{model.__name__}"}}},
    }
    if headers:
        documented["headers"] = headers
    return documented


def empty(description: str) -> dict[str, Any]:
    """Document an answer without a body, such as a 204."""
    return {"description": description}


def validation_failed(exc: ValidationError) -> Response:
    """Answer a request whose body, query or path does not fit its model (422)."""
    errors = [
        {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    return problem_of(ValidationFailed("the request is not valid", errors=errors))


def create_openapi(import_name: str) -> OpenAPI:
    """Build the Flask app that records every route into the OpenAPI document."""
    app = OpenAPI(
        import_name,
        info=Info(
            title="Conveyor",
            version=version("conveyor"),
            description="Background jobs over HTTP: submit, watch, cancel and retry jobs, "
            "run them on schedules, and manage who may do what.",
        ),
        security_schemes=SECURITY_SCHEMES,
        responses=problems(500),
        doc_ui=False,
        validation_error_status=422,
        validation_error_model=Problem,
        validation_error_callback=validation_failed,
    )
    app.register_blueprint(docs)
    return app


docs = Blueprint("docs", __name__)


@docs.get("/openapi.json")
def openapi_json() -> Response:
    """Serve the OpenAPI 3.1 document."""
    return jsonify(_document(current_app))


@functools.cache
def _document(app: Flask) -> dict[str, Any]:
    # Built once per app: the routes do not change after start-up.
    assert isinstance(app, OpenAPI)
    document = app.api_doc
    unexpected = problems(500)[500]
    for operations in document["paths"].values():
        for operation in operations.values():
            answers = operation["responses"]
            # flask-openapi3 adds its own 422 (a bare array) to operations that declare
            # none; ours declare theirs where input can be invalid, as a problem.
            if "application/json" in answers.get("422", {}).get("content", {}):
                del answers["422"]
            answers.setdefault("500", unexpected)
    return document


@docs.get("/docs")
def swagger_ui() -> Response:
    """Serve Swagger UI, under a CSP that allows only this server's own scripts and styles."""
    response = send_from_directory(_DOCS_ASSETS, "index.html", max_age=0)
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response


@docs.get("/docs/assets/<path:name>")
def docs_asset(name: str) -> Response:
    """Serve our own docs script and stylesheet."""
    return send_from_directory(_DOCS_ASSETS, name, max_age=3600)


@docs.get("/docs/swagger/<path:name>")
def swagger_asset(name: str) -> Response:
    """Serve Swagger UI's bundled scripts, styles and images."""
    return send_from_directory(_SWAGGER_ASSETS, name, max_age=86400)
