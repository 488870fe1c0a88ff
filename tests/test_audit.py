"""The audit trail: who cancelled, retried, deleted or changed what, and when."""

from __future__ import annotations

from typing import Any

from tests.conftest import bearer
from tests.test_api import assert_problem


def test_cancel_retry_and_changes_leave_audit_rows(
    client: Any, role_tokens: dict[str, str], identity: Any
) -> None:
    operator = bearer(role_tokens["operator"])
    admin = bearer(role_tokens["admin"])
    job = client.post(
        "/v1/jobs", json={"type": "system.noop", "delay_seconds": 600}, headers=operator
    ).get_json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=operator)
    client.post(f"/v1/jobs/{job['id']}/retry", headers=operator)
    schedule = client.post(
        "/v1/schedules",
        json={"name": "s", "job_type": "system.noop", "interval_seconds": 60},
        headers=admin,
    ).get_json()
    client.delete(f"/v1/schedules/{schedule['id']}", headers=admin)
    key = client.post("/v1/api-keys", json={"name": "k", "role": "viewer"}, headers=admin)
    client.delete(f"/v1/api-keys/{key.get_json()['id']}", headers=admin)

    entries = client.get("/v1/audit", headers=admin).get_json()["items"]
    actions = [(e["action"], e["target_id"]) for e in reversed(entries)]
    assert actions == [
        ("job.cancel", job["id"]),
        ("job.retry", job["id"]),
        ("schedule.create", schedule["id"]),
        ("schedule.delete", schedule["id"]),
        ("api_key.create", key.get_json()["id"]),
        ("api_key.revoke", key.get_json()["id"]),
    ]
    cancel = entries[-1]
    assert cancel["detail"] == {"outcome": "cancelled"}
    assert cancel["actor_api_key_id"] is not None
    assert cancel["actor_user_id"] == str(identity.user.id)  # the key's creator
    page = client.get("/v1/audit?limit=2", headers=admin).get_json()["items"]
    older = client.get(f"/v1/audit?before_id={page[-1]['id']}", headers=admin).get_json()["items"]
    assert [e["id"] for e in page + older] == [e["id"] for e in entries]
    assert_problem(client.get("/v1/audit", headers=operator), 403)
