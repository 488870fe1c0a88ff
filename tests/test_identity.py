"""People and services: sign-up, tokens, keys, deactivation, and the attacks on each."""

from __future__ import annotations

import base64
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.models import Tenant, User
from conveyor.settings import Settings
from tests.conftest import bearer
from tests.test_api import assert_problem

PASSWORD = "correct horse battery"


def register(client: Any, email: str = "owner@example.com", **extra: Any) -> Any:
    body = {"email": email, "password": PASSWORD, "tenant_name": "Globex", **extra}
    return client.post("/v1/auth/register", json=body)


def login(client: Any, email: str = "owner@example.com", password: str = PASSWORD) -> Any:
    return client.post("/v1/auth/login", json={"email": email, "password": password})


@pytest.fixture
def tokens(client: Any, committed: None) -> dict[str, Any]:
    assert register(client).status_code == 201
    response = login(client)
    assert response.status_code == 200
    body: dict[str, Any] = response.get_json()
    return body


def counts(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with sessions() as session:
        tenants = session.scalar(select(func.count()).select_from(Tenant)) or 0
        users = session.scalar(select(func.count()).select_from(User)) or 0
        return tenants, users


def test_register_creates_a_tenant_and_its_admin(client: Any, committed: None) -> None:
    response = register(client, email="  Owner@Example.COM ")
    assert response.status_code == 201
    body = response.get_json()
    assert body["user"]["email"] == "owner@example.com"
    assert body["user"]["role"] == "admin"
    assert body["tenant"]["name"] == "Globex"
    assert_problem(register(client, email="OWNER@example.com"), 409)


def test_login_returns_the_token_shape(tokens: dict[str, Any], client: Any) -> None:
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] == 15 * 60
    me = client.get("/v1/me", headers=bearer(tokens["access_token"])).get_json()
    assert me["role"] == "admin"
    assert me["user"]["email"] == "owner@example.com"
    assert me["api_key_id"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email", "password": PASSWORD, "tenant_name": "T"}, "email"),
        ({"email": "a@example.com", "password": "short", "tenant_name": "T"}, "password"),
        ({"email": "a@example.com", "password": "p" * 1025, "tenant_name": "T"}, "password"),
        ({"email": "a@example.com", "password": PASSWORD}, "tenant_name"),
        ({"email": "a@example.com", "password": PASSWORD, "tenant_name": "t" * 201}, "tenant_name"),
        ({"email": "' OR 1=1 --@example.com", "password": PASSWORD, "tenant_name": "T"}, "email"),
        ({"email": "a@example.com", "password": PASSWORD, "tenant_name": "T", "role": "x"}, "role"),
    ],
)
def test_bad_registration_names_the_field_and_writes_nothing(
    client: Any, committed: None, sessions: sessionmaker[Session], body: dict[str, Any], field: str
) -> None:
    problem = assert_problem(client.post("/v1/auth/register", json=body), 422)
    assert field in [e["field"] for e in problem["errors"]]
    assert counts(sessions) == (0, 0)


def test_invite_only_sign_up_refuses_registration(
    settings: Settings, committed: None, sessions: sessionmaker[Session]
) -> None:
    app = create_app(settings.model_copy(update={"signup": "invite"}))
    assert_problem(register(app.test_client()), 403)
    assert counts(sessions) == (0, 0)
    app.extensions["conveyor"].engine.dispose()


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("owner@example.com", "wrong password!"),
        ("nobody@example.com", PASSWORD),
        ("' OR '1'='1", "' OR '1'='1"),
        ("x" * 320, "y" * 1024),
    ],
)
def test_wrong_credentials_are_401(
    tokens: dict[str, Any], client: Any, email: str, password: str
) -> None:
    assert_problem(login(client, email, password), 401)


def test_failed_login_takes_as_long_for_unknown_emails(tokens: dict[str, Any], client: Any) -> None:
    def median_seconds(email: str) -> float:
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            assert login(client, email, "wrong password!").status_code == 401
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    known, unknown = median_seconds("owner@example.com"), median_seconds("ghost@example.com")
    # Both pay one argon2 verification; without the dummy hash the unknown one is ~100x faster.
    assert 0.5 < unknown / known < 2.0, (known, unknown)


def test_refresh_rotates_and_reuse_revokes_the_family(tokens: dict[str, Any], client: Any) -> None:
    first = client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert first.status_code == 200
    rotated = first.get_json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert client.get("/v1/me", headers=bearer(rotated["access_token"])).status_code == 200
    # An attacker replays the old refresh token: the whole family dies.
    replay = client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert_problem(replay, 401)
    assert_problem(client.get("/v1/me", headers=bearer(rotated["access_token"])), 401)
    again = client.post("/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]})
    assert_problem(again, 401)
    # Another login starts a new family and works.
    assert login(client).status_code == 200


def test_an_access_token_is_not_a_refresh_token(tokens: dict[str, Any], client: Any) -> None:
    swapped = client.post("/v1/auth/refresh", json={"refresh_token": tokens["access_token"]})
    assert_problem(swapped, 401)
    assert_problem(client.get("/v1/me", headers=bearer(tokens["refresh_token"])), 401)


def test_logout_revokes_access_and_refresh_at_once(tokens: dict[str, Any], client: Any) -> None:
    headers = bearer(tokens["access_token"])
    assert client.post("/v1/auth/logout", headers=headers).status_code == 204
    assert_problem(client.get("/v1/me", headers=headers), 401)
    refresh = client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert_problem(refresh, 401)


def test_access_token_expires_after_fifteen_minutes(client: Any, committed: None) -> None:
    register(client)
    with freeze_time(datetime.now(UTC)) as frozen:
        access = login(client).get_json()["access_token"]
        assert client.get("/v1/me", headers=bearer(access)).status_code == 200
        frozen.tick(timedelta(minutes=15, seconds=1))
        assert_problem(client.get("/v1/me", headers=bearer(access)), 401)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, claims, signature = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(claims))),
        signature,
    )


def test_forged_tokens_are_refused(tokens: dict[str, Any], client: Any) -> None:
    header, claims, signature = _parts(tokens["access_token"])
    stranger = str(uuid.uuid4())
    forgeries = [
        # alg none, no signature
        f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        # tampered claims under the original signature
        f"{_b64(header)}.{_b64({**claims, 'sub': stranger})}.{signature}",
        # a bad signature
        f"{_b64(header)}.{_b64(claims)}.{signature[::-1]}",
        # signed with another secret
        __import__("jwt").encode({**claims}, "another-secret-" * 3, algorithm="HS256"),
        "not.a.jwt",
        "x" * 10_000,
    ]
    for forged in forgeries:
        assert_problem(client.get("/v1/me", headers=bearer(forged)), 401)


def test_deactivated_users_tokens_and_keys_stop_at_once(
    tokens: dict[str, Any], client: Any
) -> None:
    admin = bearer(tokens["access_token"])
    member = client.post(
        "/v1/users",
        json={"email": "m@example.com", "password": PASSWORD, "role": "member"},
        headers=admin,
    ).get_json()
    member_tokens = login(client, "m@example.com").get_json()
    assert client.get("/v1/me", headers=bearer(member_tokens["access_token"])).status_code == 200
    patched = client.patch(f"/v1/users/{member['id']}", json={"is_active": False}, headers=admin)
    assert patched.get_json()["is_active"] is False
    assert_problem(client.get("/v1/me", headers=bearer(member_tokens["access_token"])), 401)
    assert_problem(login(client, "m@example.com"), 401)
    refresh = client.post(
        "/v1/auth/refresh", json={"refresh_token": member_tokens["refresh_token"]}
    )
    assert_problem(refresh, 401)


def test_admins_cannot_demote_or_deactivate_themselves(tokens: dict[str, Any], client: Any) -> None:
    admin = bearer(tokens["access_token"])
    me = client.get("/v1/me", headers=admin).get_json()["user"]
    for change in ({"role": "viewer"}, {"is_active": False}):
        assert_problem(client.patch(f"/v1/users/{me['id']}", json=change, headers=admin), 422)


def test_api_key_lifecycle(tokens: dict[str, Any], client: Any) -> None:
    admin = bearer(tokens["access_token"])
    created = client.post("/v1/api-keys", json={"name": "ci", "role": "member"}, headers=admin)
    assert created.status_code == 201
    key = created.get_json()
    assert key["key"].startswith(f"cvk_{key['prefix']}_")
    listed = client.get("/v1/api-keys", headers=admin).get_json()["items"]
    assert [k["prefix"] for k in listed] == [key["prefix"]]
    assert "key" not in listed[0]
    assert listed[0]["last_used_at"] is None
    assert client.get("/v1/me", headers=bearer(key["key"])).get_json()["role"] == "member"
    used = client.get("/v1/api-keys", headers=admin).get_json()["items"][0]
    assert used["last_used_at"] is not None
    assert client.delete(f"/v1/api-keys/{key['id']}", headers=admin).status_code == 204
    assert_problem(client.get("/v1/me", headers=bearer(key["key"])), 401)
    assert client.get("/v1/api-keys", headers=admin).get_json()["items"] == []
    assert_problem(client.delete(f"/v1/api-keys/{key['id']}", headers=admin), 404)


def test_expired_key_is_refused(tokens: dict[str, Any], client: Any) -> None:
    admin = bearer(tokens["access_token"])
    expires = datetime.now(UTC) + timedelta(hours=1)
    key = client.post(
        "/v1/api-keys",
        json={"name": "temp", "role": "viewer", "expires_at": expires.isoformat()},
        headers=admin,
    ).get_json()
    assert client.get("/v1/me", headers=bearer(key["key"])).status_code == 200
    with freeze_time(expires + timedelta(seconds=1)):
        assert_problem(client.get("/v1/me", headers=bearer(key["key"])), 401)
    past = {"name": "p", "role": "viewer", "expires_at": "2020-01-01T00:00:00Z"}
    assert_problem(client.post("/v1/api-keys", json=past, headers=admin), 422)
    naive = {"name": "p", "role": "viewer", "expires_at": "2099-01-01T00:00:00"}
    assert_problem(client.post("/v1/api-keys", json=naive, headers=admin), 422)


def test_a_key_never_acts_above_its_creator(tokens: dict[str, Any], client: Any) -> None:
    admin = bearer(tokens["access_token"])
    client.post(
        "/v1/users",
        json={"email": "op@example.com", "password": PASSWORD, "role": "operator"},
        headers=admin,
    )
    operator = bearer(login(client, "op@example.com").get_json()["access_token"])
    escalation = client.post("/v1/api-keys", json={"name": "x", "role": "admin"}, headers=operator)
    assert_problem(escalation, 403)
    key = client.post("/v1/api-keys", json={"name": "y", "role": "operator"}, headers=operator)
    token = key.get_json()["key"]
    assert client.get("/v1/api-keys", headers=bearer(token)).status_code == 200
    # Demote the creator: the key is capped at the creator's new role at once.
    users = client.get("/v1/users", headers=admin).get_json()["items"]
    op_id = next(u["id"] for u in users if u["email"] == "op@example.com")
    client.patch(f"/v1/users/{op_id}", json={"role": "viewer"}, headers=admin)
    assert client.get("/v1/me", headers=bearer(token)).get_json()["role"] == "viewer"
    assert_problem(client.get("/v1/api-keys", headers=bearer(token)), 403)


def test_tenant_walls_hide_other_tenants_objects(
    tokens: dict[str, Any], client: Any, role_tokens: dict[str, str]
) -> None:
    mine = bearer(tokens["access_token"])
    theirs = bearer(role_tokens["admin"])
    job = client.post("/v1/jobs", json={"type": "system.noop"}, headers=theirs).get_json()
    their_key = client.post("/v1/api-keys", json={"name": "k", "role": "viewer"}, headers=theirs)
    their_users = client.get("/v1/users", headers=theirs).get_json()["items"]
    assert_problem(client.get(f"/v1/jobs/{job['id']}", headers=mine), 404)
    assert_problem(client.get(f"/v1/jobs/{job['id']}/events", headers=mine), 404)
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=mine), 404)
    assert_problem(client.post(f"/v1/jobs/{job['id']}/retry", headers=mine), 404)
    assert client.get("/v1/jobs", headers=mine).get_json()["items"] == []
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=theirs)
    assert (
        client.post("/v1/jobs/retry", json={"state": "cancelled"}, headers=mine).get_json()[
            "retried"
        ]
        == 0
    )
    # Their job is untouched by all of that.
    assert client.get(f"/v1/jobs/{job['id']}", headers=theirs).get_json()["state"] == "cancelled"
    assert_problem(client.delete(f"/v1/api-keys/{their_key.get_json()['id']}", headers=mine), 404)
    patch = client.patch(f"/v1/users/{their_users[0]['id']}", json={"role": "viewer"}, headers=mine)
    assert_problem(patch, 404)
    my_users = client.get("/v1/users", headers=mine).get_json()["items"]
    assert [u["email"] for u in my_users] == ["owner@example.com"]
    my_keys = client.get("/v1/api-keys", headers=mine).get_json()["items"]
    assert my_keys == []
    schedule = client.post(
        "/v1/schedules",
        json={"name": "theirs", "job_type": "system.noop", "interval_seconds": 60},
        headers=theirs,
    ).get_json()
    path = f"/v1/schedules/{schedule['id']}"
    assert_problem(client.get(path, headers=mine), 404)
    assert_problem(client.patch(path, json={"enabled": False}, headers=mine), 404)
    assert_problem(client.post(f"{path}/trigger", headers=mine), 404)
    assert_problem(client.delete(path, headers=mine), 404)
    assert client.get("/v1/schedules", headers=mine).get_json()["items"] == []
    assert client.get(path, headers=theirs).get_json()["enabled"] is True


def test_malicious_authorization_headers_are_401(tokens: dict[str, Any], client: Any) -> None:
    for header in ["Bearer cvk_' OR 1=1 --_x", "Bearer cvk_%00_%00", "Bearer " + "cvk_" * 5000]:
        assert_problem(client.get("/v1/me", headers={"Authorization": header}), 401)


def test_login_is_rate_limited_per_email_with_retry_after(
    settings: Settings, committed: None
) -> None:
    strict = settings.model_copy(
        update={"auth_rate_limit_email": "2/minute", "rate_limit_prefix": uuid.uuid4().hex}
    )
    app = create_app(strict)
    client = app.test_client()
    for _ in range(2):
        assert_problem(login(client, "victim@example.com", "guess guess guess"), 401)
    limited = login(client, "Victim@Example.com", "guess guess guess")
    assert_problem(limited, 429)
    assert int(limited.headers["Retry-After"]) > 0
    # Another email from the same IP is not held back by the per-email limit.
    assert_problem(login(client, "other@example.com", "guess guess guess"), 401)
    app.extensions["conveyor"].engine.dispose()


def test_login_is_rate_limited_per_ip(settings: Settings, committed: None) -> None:
    strict = settings.model_copy(
        update={"auth_rate_limit_ip": "3/minute", "rate_limit_prefix": uuid.uuid4().hex}
    )
    app = create_app(strict)
    client = app.test_client()
    statuses = [login(client, f"u{n}@example.com", "x" * 12).status_code for n in range(4)]
    assert statuses == [401, 401, 401, 429]
    app.extensions["conveyor"].engine.dispose()


def test_rate_limiting_fails_open_when_redis_is_down(
    settings: Settings, committed: None, sessions: sessionmaker[Session]
) -> None:
    app = create_app(
        settings.model_copy(
            update={
                "redis_url": SecretStr("redis://127.0.0.1:1/0"),
                "auth_rate_limit_ip": "1/minute",
            }
        )
    )
    client = app.test_client()
    assert register(client).status_code == 201
    assert login(client).status_code == 200
    assert login(client).status_code == 200
    app.extensions["conveyor"].engine.dispose()


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/auth/refresh", {"refresh_token": "' OR 1=1 --"}, 401),
        ("/v1/auth/refresh", {"refresh_token": "x" * 5000}, 422),
        ("/v1/auth/login", {"email": "a@example.com"}, 422),
        ("/v1/users", {"email": "u@example.com", "password": PASSWORD, "role": "superuser"}, 422),
        ("/v1/users", {"email": "u@example.com", "password": PASSWORD}, 422),
        (
            "/v1/users",
            {"email": "'; DROP TABLE users; --", "password": PASSWORD, "role": "viewer"},
            422,
        ),
        ("/v1/api-keys", {"name": "k" * 201, "role": "viewer"}, 422),
        ("/v1/api-keys", {"name": "k", "role": "root"}, 422),
        ("/v1/api-keys", {"name": "'; DROP TABLE api_keys; --", "role": "viewer"}, 201),
    ],
)
def test_hostile_auth_fields_are_refused_or_stored_inert(
    tokens: dict[str, Any],
    client: Any,
    sessions: sessionmaker[Session],
    path: str,
    body: dict[str, Any],
    status: int,
) -> None:
    before = counts(sessions)
    response = client.post(path, json=body, headers=bearer(tokens["access_token"]))
    assert response.status_code == status, response.get_json()
    assert counts(sessions) == before
    if status == 201:  # stored as plain data, and listed back verbatim
        listed = client.get(path, headers=bearer(tokens["access_token"])).get_json()["items"]
        assert listed[0]["name"] == body["name"]
