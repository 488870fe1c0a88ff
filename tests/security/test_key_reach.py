"""Issue #15, findings 5 and 6: key management never reaches above the caller.

Revoking, like creating, stops at the caller's own role; a key made by a key expires no
later than its creator, and revoking a key revokes every key it created, each audited.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.auth.keys import Principal, create_api_key, revoke_api_key
from conveyor.auth.roles import Role, check_grant
from conveyor.errors import Forbidden, Unauthorized
from tests.conftest import bearer
from tests.test_api import assert_problem


def new_key(client: Any, creator: str, role: str, expires_at: datetime | None = None) -> Any:
    """Create a key with `creator`'s token; return the response."""
    body: dict[str, Any] = {"name": f"{role} key", "role": role}
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
    return client.post("/v1/api-keys", json=body, headers=bearer(creator))


def works(client: Any, token: str) -> bool:
    """Return whether a key still authenticates."""
    status: int = client.get("/v1/me", headers=bearer(token)).status_code
    assert status in (200, 401)
    return status == 200


def test_an_operator_cannot_revoke_an_admin_key(client: Any, role_tokens: dict[str, str]) -> None:
    operator, admin = role_tokens["operator"], role_tokens["admin"]
    keys = {
        k["name"]: k["id"] for k in client.get("/v1/api-keys", headers=bearer(admin)).json["items"]
    }
    refused = client.delete(f"/v1/api-keys/{keys['admin key']}", headers=bearer(operator))
    assert "cannot revoke the admin role" in assert_problem(refused, 403)["detail"]
    assert works(client, admin)
    # An equal or lower role is still the operator's to revoke.
    for name in ("viewer key", "operator key"):
        assert (
            client.delete(f"/v1/api-keys/{keys[name]}", headers=bearer(operator)).status_code == 204
        )
    assert not works(client, role_tokens["viewer"])
    assert not works(client, operator)
    audit = client.get("/v1/audit", headers=bearer(admin)).json["items"]
    revoked = {e["target_id"] for e in audit if e["action"] == "api_key.revoke"}
    assert revoked == {keys["viewer key"], keys["operator key"]}


def test_one_rule_for_granting_and_revoking() -> None:
    check_grant("operator", "operator", action="revoke")
    with pytest.raises(Forbidden, match="a member cannot revoke the operator role"):
        check_grant("member", "operator", action="revoke")
    with pytest.raises(Forbidden, match="a operator cannot grant the admin role"):
        check_grant("operator", "admin")


def test_a_key_made_by_a_key_expires_no_later_than_its_creator(client: Any, identity: Any) -> None:
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=10)
    parent = new_key(client, identity.token, "operator", soon).json
    assert parent["expiry_capped"] is False
    assert parent["created_by_key_id"] == str(identity.api_key.id)
    never = new_key(client, parent["key"], "viewer")
    assert never.status_code == 201
    later = new_key(client, parent["key"], "viewer", soon + timedelta(days=365))
    earlier = new_key(client, parent["key"], "viewer", soon - timedelta(minutes=5))
    for capped in (never.json, later.json):
        assert datetime.fromisoformat(capped["expires_at"]) == soon
        assert capped["expiry_capped"] is True
        assert capped["created_by_key_id"] == parent["id"]
    assert datetime.fromisoformat(earlier.json["expires_at"]) == soon - timedelta(minutes=5)
    assert earlier.json["expiry_capped"] is False
    # The admin's key never expires: what it makes keeps the expiry it asked for (none).
    unbounded = new_key(client, identity.token, "viewer").json
    assert (unbounded["expires_at"], unbounded["expiry_capped"]) == (None, False)


def test_revoking_a_key_revokes_the_keys_it_created_and_audits_each(
    client: Any, identity: Any
) -> None:
    admin = identity.token
    parent = new_key(client, admin, "operator").json
    child = new_key(client, parent["key"], "operator").json
    grandchild = new_key(client, child["key"], "viewer").json
    sibling = new_key(client, admin, "operator").json  # made by the same admin key, not by parent
    for key in (parent, child, grandchild, sibling):
        assert works(client, key["key"])  # and cached in this API process

    assert client.delete(f"/v1/api-keys/{parent['id']}", headers=bearer(admin)).status_code == 204

    assert [works(client, k["key"]) for k in (parent, child, grandchild, sibling)] == [
        False,
        False,
        False,
        True,
    ]
    live = {k["id"] for k in client.get("/v1/api-keys", headers=bearer(admin)).json["items"]}
    assert live == {str(identity.api_key.id), sibling["id"]}
    audit = client.get("/v1/audit", headers=bearer(admin)).json["items"]
    revokes = [
        (e["target_id"], e["detail"]) for e in reversed(audit) if e["action"] == "api_key.revoke"
    ]
    assert revokes[0] == (parent["id"], None)
    assert sorted(revokes[1:], key=str) == sorted(
        [
            (child["id"], {"cascade_from": parent["id"]}),
            (grandchild["id"], {"cascade_from": child["id"]}),
        ],
        key=str,
    )
    assert_problem(client.delete(f"/v1/api-keys/{child['id']}", headers=bearer(admin)), 404)


def test_revoking_a_child_leaves_its_creator_working(client: Any, identity: Any) -> None:
    parent = new_key(client, identity.token, "operator").json
    child = new_key(client, parent["key"], "viewer").json
    assert (
        client.delete(f"/v1/api-keys/{child['id']}", headers=bearer(parent["key"])).status_code
        == 204
    )
    assert works(client, parent["key"])
    assert not works(client, child["key"])


def test_a_key_revoked_meanwhile_creates_nothing(
    sessions: Any, settings: Any, identity: Any
) -> None:
    """Another API process may trust the key from its cache; creating re-reads it, locked."""
    now = datetime.now(UTC)
    as_key = Principal(
        tenant_id=identity.tenant.id,
        role=Role.ADMIN,
        user_id=identity.user.id,
        api_key_id=identity.api_key.id,
    )
    with sessions.begin() as session:
        revoke_api_key(session, as_key, identity.api_key.id, now)
    with sessions.begin() as session, pytest.raises(Unauthorized):
        create_api_key(
            session,
            settings.secret_key,
            as_key,
            name="late",
            role=Role.VIEWER,
            expires_at=None,
            now=now,
        )
