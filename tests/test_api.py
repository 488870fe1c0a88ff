"""The HTTP API over real PostgreSQL and Redis, without a worker: submit, poll, bad input."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from redis import Redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.broker.inspect import queue_depth
from conveyor.models import Job, JobEvent
from conveyor.settings import Settings
from tests.factories import other_tenant


def job_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def published(redis_client: Redis, settings: Settings) -> int:
    return queue_depth(redis_client, settings.default_queue)


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = response.get_json(force=True)
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["type"].startswith("https://")
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


def test_submit_stores_publishes_and_points_to_the_job(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    redis_client: Redis,
    settings: Settings,
) -> None:
    before = published(redis_client, settings)
    response = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth)
    assert response.status_code == 202
    body = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{body['id']}"
    assert (body["type"], body["state"], body["attempts"]) == ("system.noop", "queued", 0)
    assert published(redis_client, settings) == before + 1
    message = json.loads(redis_client.lindex(f"{settings.default_queue}:9", 0) or b"{}")
    assert message["headers"]["id"] == body["id"]
    assert message["headers"]["task"] == "system.noop"
    with sessions() as session:
        job = session.get_one(Job, uuid.UUID(body["id"]))
        assert job.published_at is not None
        assert session.scalar(select(func.count()).where(JobEvent.job_id == job.id)) == 1
    redis_client.delete(f"{settings.default_queue}:9")


def test_poll_returns_the_job_and_its_fields(client: Any, auth: dict[str, str]) -> None:
    created = client.post(
        "/v1/jobs", json={"type": "system.sleep", "payload": {"seconds": 2}}, headers=auth
    ).get_json()
    response = client.get(f"/v1/jobs/{created['id']}", headers=auth)
    assert response.status_code == 200
    body = response.get_json()
    assert body["id"] == created["id"]
    assert body["payload"] == {"seconds": 2.0}
    assert body["state"] == "queued"
    assert body["result"] is None
    assert body["error"] is None
    assert body["progress"] is None
    assert body["started_at"] is None
    assert body["created_at"]


@pytest.mark.parametrize(
    ("kwargs", "status", "field"),
    [
        ({"json": {"type": "no.such.type"}}, 422, "type"),
        ({"json": {"type": "system.sleep", "payload": {"seconds": -1}}}, 422, "payload.seconds"),
        ({"json": {"type": "system.sleep", "payload": {}}}, 422, "payload.seconds"),
        ({"json": {"type": "system.noop", "payload": {"x": 1}}}, 422, "payload.x"),
        ({"json": {"type": "system.noop", "extra": 1}}, 422, "extra"),
        ({"json": {"payload": {}}}, 422, "type"),
        ({"json": ["system.noop"]}, 422, "body"),
        ({"data": "{not json", "content_type": "application/json"}, 400, None),
        ({"data": "type=system.noop", "content_type": "text/plain"}, 415, None),
        ({"data": "x" * (1024 * 1024 + 1), "content_type": "application/json"}, 413, None),
    ],
)
def test_bad_input_is_a_problem_and_writes_nothing(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    redis_client: Redis,
    settings: Settings,
    kwargs: dict[str, Any],
    status: int,
    field: str | None,
) -> None:
    before = published(redis_client, settings)
    body = assert_problem(client.post("/v1/jobs", headers=auth, **kwargs), status)
    if field is not None:
        assert field in [e["field"] for e in body["errors"]]
    assert job_count(sessions) == 0
    assert published(redis_client, settings) == before


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Basic abc", "Bearer cvk_nope", "Bearer cvk_0123456789ab_wrongsecret"],
)
def test_missing_or_wrong_key_is_401_and_writes_nothing(
    client: Any,
    identity: Any,
    sessions: sessionmaker[Session],
    redis_client: Redis,
    settings: Settings,
    header: str | None,
) -> None:
    headers = {"Authorization": header} if header else {}
    before = published(redis_client, settings)
    assert_problem(client.post("/v1/jobs", json={"type": "system.noop"}, headers=headers), 401)
    assert job_count(sessions) == 0
    assert published(redis_client, settings) == before


def test_a_real_prefix_with_the_wrong_secret_is_401(client: Any, identity: Any) -> None:
    forged = identity.token.rsplit("_", 1)[0] + "_forged"
    response = client.get(f"/v1/jobs/{uuid.uuid4()}", headers={"Authorization": f"Bearer {forged}"})
    assert_problem(response, 401)


@pytest.mark.parametrize("job_id", ["not-a-uuid", str(uuid.uuid4()), "123"])
def test_unknown_or_malformed_id_is_404(client: Any, auth: dict[str, str], job_id: str) -> None:
    assert_problem(client.get(f"/v1/jobs/{job_id}", headers=auth), 404)


def test_another_tenants_job_is_404(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], settings: Settings
) -> None:
    job_id = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).get_json()["id"]
    other = other_tenant(sessions, settings)
    response = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other.token}"})
    assert_problem(response, 404)


def test_unknown_route_and_method_are_problems(client: Any) -> None:
    assert_problem(client.get("/nowhere"), 404)
    assert_problem(client.delete("/healthz"), 405)


def test_request_id_is_echoed_when_valid_and_replaced_when_not(client: Any) -> None:
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"]
        == "abc-123"
    )
    replaced = client.get("/healthz", headers={"X-Request-ID": "bad id <script>"}).headers[
        "X-Request-ID"
    ]
    assert replaced != "bad id <script>"
    assert len(replaced) == 32


def test_health_and_readiness(client: Any) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "broker": "ok", "result_backend": "ok"}


def test_a_plain_submit_is_one_statement_and_a_keyed_one_a_transaction(
    client: Any, auth: dict[str, str]
) -> None:
    """No idempotency key, unique key or dependency: the insert alone, in autocommit."""
    from bench.roundtrips import watch

    body = {"type": "system.noop"}
    assert client.post("/v1/jobs", json=body, headers=auth).status_code == 202  # quota counted
    sent = watch(client.application.extensions["conveyor"].engine)
    assert client.post("/v1/jobs", json=body, headers=auth).status_code == 202
    assert sent == {"statement": 1}
    sent.clear()
    keyed = {**auth, "Idempotency-Key": "one-statement-test"}
    first = client.post("/v1/jobs", json=body, headers=keyed)
    again = client.post("/v1/jobs", json=body, headers=keyed)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.get_json()["id"] == again.get_json()["id"]
    assert sent["begin"] == sent["commit"] == 2
    sent.clear()
    unique = {**body, "unique_key": "one-statement-test"}
    held = [client.post("/v1/jobs", json=unique, headers=auth) for _ in range(2)]
    assert [r.status_code for r in held] == [202, 200]
    assert held[0].get_json()["id"] == held[1].get_json()["id"]
    assert sent["begin"] == sent["commit"] == 2
