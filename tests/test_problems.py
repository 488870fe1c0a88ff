"""Every error the API answers, ours or Werkzeug's, is one `application/problem+json` shape."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from api import create_app
from api.openapi import Problem
from conveyor import errors
from conveyor.broker.inspect import queue_depth
from conveyor.models import Job
from conveyor.settings import Settings
from tests.test_api import assert_problem

MISSING = "00000000-0000-0000-0000-000000000000"
REQUEST_ID = "problem-test-1"


def problem_of(response: Any, status: int) -> Problem:
    """Check the common shape, then read the body as the documented `Problem` model."""
    body = assert_problem(response, status)
    assert body["request_id"] == REQUEST_ID
    return Problem.model_validate(body)


Call = Callable[[Any, dict[str, str]], Any]
CASES: dict[int, tuple[Call, str]] = {
    400: (
        lambda c, h: c.post(
            "/v1/jobs", data=b'{"type": ', headers={**h, "Content-Type": "application/json"}
        ),
        "not valid JSON",
    ),
    401: (
        lambda c, h: c.get("/v1/jobs", headers={"X-Request-ID": REQUEST_ID}),
        "Authorization",
    ),
    404: (lambda c, h: c.get(f"/v1/jobs/{MISSING}", headers=h), MISSING),
    405: (lambda c, h: c.delete("/v1/jobs", headers=h), "not allowed"),
    409: (
        lambda c, h: c.post("/v1/jobs/retry", json={"state": "queued"}, headers=h),
        "cannot be retried",
    ),
    413: (
        lambda c, h: c.post(
            "/v1/jobs",
            data=b"{" + b" " * (2 << 20) + b"}",
            headers={**h, "Content-Type": "application/json"},
        ),
        "",
    ),
    415: (lambda c, h: c.post("/v1/jobs", data="type=x", headers=h), "application/json"),
    422: (
        lambda c, h: c.post("/v1/jobs", json={"type": "system.sleep", "payload": {}}, headers=h),
        "payload does not match system.sleep",
    ),
}


@pytest.mark.parametrize("status", sorted(CASES))
def test_each_client_error_is_a_problem(
    client: Any, auth: dict[str, str], status: int, redis_client: Any, settings: Settings
) -> None:
    call, says = CASES[status]
    before = queue_depth(redis_client, settings.default_queue)
    response = call(client, {**auth, "X-Request-ID": REQUEST_ID})
    problem = problem_of(response, status)
    assert says in problem.detail
    assert queue_depth(redis_client, settings.default_queue) == before  # nothing published
    if status == 422:
        assert problem.errors
        assert problem.errors[0].field == "payload.seconds"
    if status == 405:
        assert "GET" in response.headers["Allow"]
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_bad_query_parameters_are_the_same_422_as_a_bad_body(
    client: Any, auth: dict[str, str]
) -> None:
    headers = {**auth, "X-Request-ID": REQUEST_ID}
    query = problem_of(client.get("/v1/jobs?limit=0&state=bogus", headers=headers), 422)
    body = problem_of(client.post("/v1/jobs", json={"type": 7}, headers=headers), 422)
    assert query.type == body.type == "https://conveyor.dev/problems/validation"
    assert {e.field for e in query.errors or []} == {"limit", "state"}
    assert [e.field for e in body.errors or []] == ["type"]


def test_a_forbidden_action_is_a_403_problem(client: Any, role_tokens: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {role_tokens['viewer']}", "X-Request-ID": REQUEST_ID}
    response = client.post("/v1/jobs", json={"type": "system.noop"}, headers=headers)
    assert "submit" in problem_of(response, 403).detail


def test_too_many_sign_ins_is_a_429_problem_with_retry_after(settings: Settings) -> None:
    limited = settings.model_copy(
        update={"auth_rate_limit_ip": "2/minute", "rate_limit_prefix": uuid.uuid4().hex}
    )
    app = create_app(limited)
    try:
        client = app.test_client()
        login = {"email": "nobody@example.com", "password": "wrong password"}
        headers = {"X-Request-ID": REQUEST_ID}
        statuses = [client.post("/v1/auth/login", json=login, headers=headers) for _ in range(3)]
    finally:
        app.extensions["conveyor"].engine.dispose()
    assert [r.status_code for r in statuses] == [401, 401, 429]
    problem_of(statuses[2], 429)
    assert 0 < int(statuses[2].headers["Retry-After"]) <= 60


def test_an_unexpected_error_is_a_500_problem_logged_with_its_request_id(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def explode() -> None:
        raise RuntimeError("SELECT password FROM users")

    app.add_url_rule("/explode", view_func=explode)
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        response = app.test_client().get("/explode", headers={"X-Request-ID": REQUEST_ID})
    problem = problem_of(response, 500)
    assert "SELECT" not in response.get_data(as_text=True)
    assert problem.errors is None
    (record,) = [r for r in caplog.records if r.name == "api.errors"]
    assert REQUEST_ID in record.getMessage()
    assert record.exc_info is not None  # the traceback goes to the log, not the client


HOSTILE_BODIES = {
    "invalid UTF-8": (b'{"type": "system.noop", "tags": ["\xff\xfe"]}', 400),
    "a number beyond any int": (b'{"type": "system.noop", "priority": 1e400}', 422),
    "a 5,000-digit integer": (b'{"type": "system.noop", "priority": ' + b"9" * 5000 + b"}", 400),
    "SQL in the type": (b'{"type": "x\'; DROP TABLE jobs; --"}', 422),
    "markup in the payload's keys": (b'{"type": "system.sleep", "payload": {"<script>": 1}}', 422),
    "a JSON array": (b'[{"type": "system.noop"}]', 422),
    "a JSON string": (b'"{\\"type\\": \\"system.noop\\"}"', 422),
    "an empty body": (b"", 400),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_bodies_are_4xx_problems_that_write_nothing(
    client: Any, auth: dict[str, str], sessions: Any, name: str
) -> None:
    body, status = HOSTILE_BODIES[name]
    headers = {**auth, "Content-Type": "application/json", "X-Request-ID": REQUEST_ID}
    response = client.post("/v1/jobs", data=body, headers=headers)
    problem_of(response, status)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


# Each of the tree's errors as a client reads it: the contract `api.errors` must keep.
DOCUMENTED = {
    "MalformedRequest": (400, "Malformed request", "malformed-request"),
    "Unauthorized": (401, "Unauthorized", "unauthorized"),
    "Forbidden": (403, "Forbidden", "forbidden"),
    "NotFound": (404, "Not found", "not-found"),
    "Conflict": (409, "Conflict", "conflict"),
    "StorageQuotaExceeded": (413, "Storage quota exceeded", "storage-quota-exceeded"),
    "UnsupportedMediaType": (415, "Unsupported media type", "unsupported-media-type"),
    "ValidationFailed": (422, "Validation failed", "validation"),
    "UnknownJobType": (422, "Unknown job type", "unknown-job-type"),
    "UnstorableData": (422, "Unstorable data", "unstorable-data"),
    "RateLimited": (429, "Too many requests", "rate-limited"),
    "QuotaExceeded": (429, "Quota exceeded", "quota-exceeded"),
    "ServiceUnavailable": (503, "Service unavailable", "unavailable"),
    "PublishFailed": (503, "Broker unavailable", "broker-unavailable"),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_each_error_of_the_tree_answers_its_documented_problem(app: Any, name: str) -> None:
    cls = getattr(errors, name)
    field_errors = [{"field": "x", "message": "wrong"}]
    kwargs: dict[str, Any] = {"errors": field_errors}
    if issubclass(cls, errors.RateLimited):
        kwargs["retry_after"] = 7

    def fail() -> None:
        raise cls("what happened", **kwargs)

    app.add_url_rule("/fail", view_func=fail)
    response = app.test_client().get("/fail", headers={"X-Request-ID": REQUEST_ID})
    status, title, slug = DOCUMENTED[name]
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    assert response.get_json() == {
        "type": f"https://conveyor.dev/problems/{slug}",
        "title": title,
        "status": status,
        "detail": "what happened",
        "errors": field_errors,
        "request_id": REQUEST_ID,
    }
    assert response.headers.get("Retry-After") == ("7" if status == 429 else None)
    assert response.headers.get("WWW-Authenticate") == ("Bearer" if status == 401 else None)
