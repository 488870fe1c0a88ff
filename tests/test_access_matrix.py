"""Every endpoint by every role (and no credentials): the status each must get."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import bearer

ROLES = ["admin", "operator", "member", "viewer", None]


def _submit(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json={"type": "system.noop"}, headers=headers)


def _read_job(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get(f"/v1/jobs/{ctx['job_id']}", headers=headers)


def _me(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get("/v1/me", headers=headers)


def _add_user(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    body = {"email": f"{uuid.uuid4().hex[:8]}@example.com", "password": "x" * 12, "role": "viewer"}
    return client.post("/v1/users", json=body, headers=headers)


def _list_users(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get("/v1/users", headers=headers)


def _change_user(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.patch(f"/v1/users/{ctx['user_id']}", json={"role": "viewer"}, headers=headers)


def _create_key(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.post("/v1/api-keys", json={"name": "svc", "role": "viewer"}, headers=headers)


def _list_keys(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get("/v1/api-keys", headers=headers)


def _revoke_key(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    admin = bearer(ctx["tokens"]["admin"])
    victim = client.post("/v1/api-keys", json={"name": "v", "role": "viewer"}, headers=admin)
    return client.delete(f"/v1/api-keys/{victim.get_json()['id']}", headers=headers)


def _logout_with_key(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.post("/v1/auth/logout", headers=headers)


def _batch(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.post("/v1/jobs/batch", json={"jobs": [{"type": "system.noop"}]}, headers=headers)


def _list_jobs(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get("/v1/jobs", headers=headers)


def _events(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get(f"/v1/jobs/{ctx['job_id']}/events", headers=headers)


def _job_types(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get("/v1/job-types", headers=headers)


def _delayed_job(client: Any, ctx: dict[str, Any]) -> str:
    admin = bearer(ctx["tokens"]["admin"])
    body = {"type": "system.noop", "delay_seconds": 3600}
    job_id: str = client.post("/v1/jobs", json=body, headers=admin).get_json()["id"]
    return job_id


def _cancel(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.post(f"/v1/jobs/{_delayed_job(client, ctx)}/cancel", headers=headers)


def _retry(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    job_id = _delayed_job(client, ctx)
    client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(ctx["tokens"]["admin"]))
    return client.post(f"/v1/jobs/{job_id}/retry", headers=headers)


def _bulk_retry(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.post("/v1/jobs/retry", json={}, headers=headers)


def _create_schedule(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    body = {"name": uuid.uuid4().hex, "job_type": "system.noop", "interval_seconds": 60}
    return client.post("/v1/schedules", json=body, headers=headers)


def _list_schedules(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get("/v1/schedules", headers=headers)


def _a_schedule(client: Any, ctx: dict[str, Any]) -> str:
    created = _create_schedule(client, bearer(ctx["tokens"]["admin"]), ctx)
    schedule_id: str = created.get_json()["id"]
    return schedule_id


def _show_schedule(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get(f"/v1/schedules/{_a_schedule(client, ctx)}", headers=headers)


def _change_schedule(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    path = f"/v1/schedules/{_a_schedule(client, ctx)}"
    return client.patch(path, json={"enabled": False}, headers=headers)


def _delete_schedule(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.delete(f"/v1/schedules/{_a_schedule(client, ctx)}", headers=headers)


def _trigger_schedule(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.post(f"/v1/schedules/{_a_schedule(client, ctx)}/trigger", headers=headers)


def _queues(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get("/v1/queues", headers=headers)


def _audit(client: Any, headers: dict[str, str], ctx: dict[str, Any]) -> Any:
    return client.get("/v1/audit", headers=headers)


Call = Callable[[Any, dict[str, str], dict[str, Any]], Any]
# expected status for admin, operator, member, viewer, no credentials
MATRIX: dict[str, tuple[Call, tuple[int, int, int, int, int]]] = {
    "POST /v1/jobs": (_submit, (202, 202, 202, 403, 401)),
    "POST /v1/jobs/batch": (_batch, (202, 202, 202, 403, 401)),
    "GET /v1/jobs": (_list_jobs, (200, 200, 200, 200, 401)),
    "GET /v1/jobs/{id}": (_read_job, (200, 200, 200, 200, 401)),
    "GET /v1/jobs/{id}/events": (_events, (200, 200, 200, 200, 401)),
    "POST /v1/jobs/{id}/cancel": (_cancel, (200, 200, 403, 403, 401)),
    "POST /v1/jobs/{id}/retry": (_retry, (202, 202, 403, 403, 401)),
    "POST /v1/jobs/retry": (_bulk_retry, (200, 200, 403, 403, 401)),
    "GET /v1/job-types": (_job_types, (200, 200, 200, 200, 401)),
    "POST /v1/schedules": (_create_schedule, (201, 201, 403, 403, 401)),
    "GET /v1/schedules": (_list_schedules, (200, 200, 200, 200, 401)),
    "GET /v1/schedules/{id}": (_show_schedule, (200, 200, 200, 200, 401)),
    "PATCH /v1/schedules/{id}": (_change_schedule, (200, 200, 403, 403, 401)),
    "DELETE /v1/schedules/{id}": (_delete_schedule, (204, 204, 403, 403, 401)),
    "POST /v1/schedules/{id}/trigger": (_trigger_schedule, (202, 202, 403, 403, 401)),
    "GET /v1/me": (_me, (200, 200, 200, 200, 401)),
    "POST /v1/users": (_add_user, (201, 403, 403, 403, 401)),
    "GET /v1/users": (_list_users, (200, 403, 403, 403, 401)),
    "PATCH /v1/users/{id}": (_change_user, (200, 403, 403, 403, 401)),
    "POST /v1/api-keys": (_create_key, (201, 201, 403, 403, 401)),
    "GET /v1/api-keys": (_list_keys, (200, 200, 403, 403, 401)),
    "DELETE /v1/api-keys/{id}": (_revoke_key, (204, 204, 403, 403, 401)),
    "POST /v1/auth/logout": (_logout_with_key, (422, 422, 422, 422, 401)),
    "GET /v1/queues": (_queues, (200, 200, 403, 403, 401)),
    "GET /v1/audit": (_audit, (200, 403, 403, 403, 401)),
}


def matrix_context(client: Any, role_tokens: dict[str, str]) -> dict[str, Any]:
    """Create what the calls act on, as the tenant's admin: a job and a user to change."""
    admin = bearer(role_tokens["admin"])
    job_id = client.post("/v1/jobs", json={"type": "system.noop"}, headers=admin).get_json()["id"]
    target = client.post(
        "/v1/users",
        json={
            "email": f"t{uuid.uuid4().hex[:6]}@example.com",
            "password": "y" * 12,
            "role": "member",
        },
        headers=admin,
    ).get_json()
    assert "id" in target, target
    return {"job_id": job_id, "user_id": target["id"], "tokens": role_tokens}


def statuses(
    client: Any, role_tokens: dict[str, str], call: Call, ctx: dict[str, Any]
) -> dict[str | None, int]:
    """Return the status `call` gets for each of ROLES (None: no credentials)."""
    return {
        role: call(client, bearer(role_tokens[role]) if role else {}, ctx).status_code
        for role in ROLES
    }


@pytest.mark.parametrize("endpoint", MATRIX)
def test_every_role_gets_the_expected_status(
    endpoint: str, client: Any, role_tokens: dict[str, str], identity: Any
) -> None:
    call, expected = MATRIX[endpoint]
    got = statuses(client, role_tokens, call, matrix_context(client, role_tokens))
    assert tuple(got.values()) == expected, got
