"""The walls between tenants and roles, extending `tests/test_access_matrix.py`.

Every route with an object id in its path, found in the app's URL map (a new route is
covered as soon as it exists), is called by another tenant's admin on this tenant's
object: `404`, and nothing changes. Internal job types by every role: never accepted.
Key rank: nobody issues a key above their own role.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.files import ArtifactWriter
from conveyor.models import Job, Schedule
from conveyor.settings import Settings
from conveyor.webhooks import DELIVER_TYPE
from tests.conftest import bearer, row_counts
from tests.factories import other_tenant
from tests.test_access_matrix import Call, _a_schedule, matrix_context, statuses
from tests.test_api import assert_problem

TABLES = (
    "jobs",
    "job_events",
    "job_dependencies",
    "workflows",
    "schedules",
    "api_keys",
    "users",
    "webhooks",
    "audit_log",
)
# What a change request sends, per endpoint that needs a body.
BODIES: dict[str, dict[str, Any]] = {
    "schedules.change": {"enabled": False},
    "users.change": {"role": "viewer"},
}


def _job(client: Any, admin: dict[str, str], sessions: sessionmaker[Session]) -> str:
    """A job waiting an hour: the owner could still cancel it."""
    body = {"type": "system.noop", "delay_seconds": 3600}
    job_id: str = client.post("/v1/jobs", json=body, headers=admin).get_json()["id"]
    return job_id


def _dead_job(client: Any, admin: dict[str, str], sessions: sessionmaker[Session]) -> str:
    """A cancelled job: the owner could retry it."""
    job_id = _job(client, admin, sessions)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=admin).status_code == 200
    return job_id


def _job_with_artifact(client: Any, admin: dict[str, str], sessions: sessionmaker[Session]) -> str:
    """A job with a file, as an export writes it: the owner could download it."""
    job_id = _job(client, admin, sessions)
    with sessions.begin() as session:
        artifact = ArtifactWriter(session, uuid.UUID(job_id), "a.csv", "text/csv")
        artifact.write(b"a,b\n")
        artifact.close()
    return job_id


def _schedule(client: Any, admin: dict[str, str], sessions: sessionmaker[Session]) -> str:
    body = {"name": uuid.uuid4().hex, "job_type": "system.noop", "interval_seconds": 3600}
    schedule_id: str = client.post("/v1/schedules", json=body, headers=admin).get_json()["id"]
    return schedule_id


def _key(client: Any, admin: dict[str, str], sessions: sessionmaker[Session]) -> str:
    body = {"name": "svc", "role": "viewer"}
    key_id: str = client.post("/v1/api-keys", json=body, headers=admin).get_json()["id"]
    return key_id


def _user(client: Any, admin: dict[str, str], sessions: sessionmaker[Session]) -> str:
    body = {"email": f"{uuid.uuid4().hex[:8]}@example.com", "password": "z" * 12, "role": "member"}
    user_id: str = client.post("/v1/users", json=body, headers=admin).get_json()["id"]
    return user_id


def _webhook(client: Any, admin: dict[str, str], sessions: sessionmaker[Session]) -> str:
    body = {"url": "https://hooks.example.com/x", "events": ["job.failed"]}
    webhook_id: str = client.post("/v1/webhooks", json=body, headers=admin).get_json()["id"]
    return webhook_id


def _workflow(client: Any, admin: dict[str, str], sessions: sessionmaker[Session]) -> str:
    """A workflow whose first job waits an hour: the owner could still cancel it."""
    jobs = [
        {"ref": "a", "type": "system.noop", "delay_seconds": 3600},
        {"ref": "b", "type": "system.noop", "depends_on": ["a"]},
    ]
    answer = client.post("/v1/workflows", json={"name": "w", "jobs": jobs}, headers=admin)
    workflow_id: str = answer.get_json()["id"]
    return workflow_id


def _listed(path: str) -> Callable[[Any, dict[str, str], str], Any]:
    """Read an object out of its list (kinds with no single-object GET)."""

    def read(client: Any, admin: dict[str, str], object_id: str) -> Any:
        items = client.get(path, headers=admin).get_json()["items"]
        return [item for item in items if item["id"] == object_id]

    return read


def _shown(path: str) -> Callable[[Any, dict[str, str], str], Any]:
    def read(client: Any, admin: dict[str, str], object_id: str) -> Any:
        return client.get(f"{path}/{object_id}", headers=admin).get_json()

    return read


Make = Callable[[Any, dict[str, str], sessionmaker[Session]], str]
# Per path argument: how the owner makes one, and reads it back to see it unchanged.
KINDS: dict[str, tuple[Make, Callable[[Any, dict[str, str], str], Any]]] = {
    "job_id": (_job, _shown("/v1/jobs")),
    "schedule_id": (_schedule, _shown("/v1/schedules")),
    "key_id": (_key, _listed("/v1/api-keys")),
    "user_id": (_user, _listed("/v1/users")),
    "webhook_id": (_webhook, _listed("/v1/webhooks")),
    "workflow_id": (_workflow, _shown("/v1/workflows")),
}
# Path arguments that name something within the caller's own tenant, not an object by id:
# another tenant's limit `stripe` is simply not the caller's (tests/test_flow.py).
NAMES = frozenset({"key", "queue"})
# Endpoints that need an object in some state for the owner's own call to succeed.
STATES: dict[str, Make] = {"job_control.retry": _dead_job, "files.artifact": _job_with_artifact}


def id_routes(app: Flask) -> list[tuple[str, str, str, str]]:
    """Return (method, rule, endpoint, id argument) for every API route with an id in its path."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/v1/") or not rule.arguments:
            continue
        (argument,) = rule.arguments
        if argument in NAMES:
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((method, rule.rule, rule.endpoint, argument))
    return sorted(routes)


def test_another_tenants_id_is_404_on_every_route_and_changes_nothing(
    app: Flask,
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    outsider = bearer(other_tenant(sessions, settings).token)
    routes = id_routes(app)
    assert {argument for *_, argument in routes} <= KINDS.keys(), "a new kind of id: add it"
    # The map is read right: the routes the issue names are among those found.
    named = {"jobs.show", "files.artifact", "schedules.trigger", "webhooks.delete", "users.change"}
    assert named | {"api_keys.revoke", "webhooks.deliveries"} <= {r[2] for r in routes}
    for method, rule, endpoint, argument in routes:
        make, read = KINDS[argument]
        object_id = STATES.get(endpoint, make)(client, auth, sessions)
        path = rule.replace(f"<{argument}>", object_id)
        body = BODIES.get(endpoint)
        before, counts = read(client, auth, object_id), row_counts(sessions, *TABLES)

        answer = client.open(path, method=method, json=body, headers=outsider)

        assert_problem(answer, 404)
        assert read(client, auth, object_id) == before, f"{method} {rule}"
        assert row_counts(sessions, *TABLES) == counts, f"{method} {rule}"
        # The owner's same call works: the 404 is the wall, not a broken object.
        owned = client.open(path, method=method, json=body, headers=auth)
        owned.close()  # a streamed answer (the artifact) holds its transaction until closed
        assert 200 <= owned.status_code < 300, (method, rule, owned.get_data(as_text=True))


def test_another_tenants_job_is_an_unknown_dependency(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], settings: Settings
) -> None:
    outsider = bearer(other_tenant(sessions, settings).token)
    theirs = client.post("/v1/jobs", json={"type": "system.noop"}, headers=outsider).get_json()
    counts = row_counts(sessions, *TABLES)

    answer = client.post(
        "/v1/jobs", json={"type": "system.noop", "depends_on": [theirs["id"]]}, headers=auth
    )

    assert_problem(answer, 422)
    assert theirs["id"] in answer.get_json()["detail"]
    assert row_counts(sessions, *TABLES) == counts
    with sessions() as session:  # their job was not even marked as depended on
        assert not session.get_one(Job, uuid.UUID(theirs["id"])).has_dependents


def _submit_internal(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    payload = {"job_id": ctx["job_id"], "event": "job.succeeded", "url": "https://a.example/"}
    return client.post("/v1/jobs", json={"type": DELIVER_TYPE, "payload": payload}, headers=headers)


def _batch_internal(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    payload = {"job_id": ctx["job_id"], "event": "job.succeeded", "url": "https://a.example/"}
    jobs = [{"type": DELIVER_TYPE, "payload": payload}]
    return client.post("/v1/jobs/batch", json={"jobs": jobs}, headers=headers)


def _schedule_internal(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    payload = {"job_id": ctx["job_id"], "event": "job.succeeded", "url": "https://a.example/"}
    body = {"name": uuid.uuid4().hex, "job_type": DELIVER_TYPE, "payload": payload}
    return client.post("/v1/schedules", json={**body, "interval_seconds": 60}, headers=headers)


def _reschedule_internal(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    payload = {"job_id": ctx["job_id"], "event": "job.succeeded", "url": "https://a.example/"}
    body = {"job_type": DELIVER_TYPE, "payload": payload}
    return client.patch(f"/v1/schedules/{_a_schedule(client, ctx)}", json=body, headers=headers)


def _key_of(role: str) -> Call:
    def create(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
        return client.post("/v1/api-keys", json={"name": "k", "role": role}, headers=headers)

    return create


# expected status for admin, operator, member, viewer, no credentials
MATRIX: dict[str, tuple[Call, tuple[int, int, int, int, int]]] = {
    "POST /v1/jobs webhooks.deliver": (_submit_internal, (422, 422, 422, 403, 401)),
    "POST /v1/jobs/batch webhooks.deliver": (_batch_internal, (422, 422, 422, 403, 401)),
    "POST /v1/schedules webhooks.deliver": (_schedule_internal, (422, 422, 403, 403, 401)),
    "PATCH /v1/schedules/{id} to webhooks.deliver": (
        _reschedule_internal,
        (422, 422, 403, 403, 401),
    ),
    "POST /v1/api-keys admin": (_key_of("admin"), (201, 403, 403, 403, 401)),
    "POST /v1/api-keys operator": (_key_of("operator"), (201, 201, 403, 403, 401)),
    "POST /v1/api-keys member": (_key_of("member"), (201, 201, 403, 403, 401)),
}


def test_internal_types_and_key_ranks_by_role(
    client: Any, role_tokens: dict[str, str], sessions: sessionmaker[Session], identity: Identity
) -> None:
    failures = {}
    for name, (call, expected) in MATRIX.items():
        got = statuses(client, role_tokens, call, matrix_context(client, role_tokens))
        if tuple(got.values()) != expected:
            failures[name] = got
    assert not failures, failures
    with sessions() as session:
        assert session.scalar(select(func.count()).where(Job.type == DELIVER_TYPE)) == 0
        assert session.scalar(select(func.count()).where(Schedule.job_type == DELIVER_TYPE)) == 0
