"""Rate limits per endpoint group, per IP and per principal: windows, keys, headers, outages."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from pydantic import SecretStr
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.orm import Session, sessionmaker

from api.rate_limits import OUTAGE_SECONDS, _Outage, endpoint_group, ip_key
from api.rate_windows import counter_key, parse_limits
from bench.roundtrips import watch_redis
from conveyor.auth.bootstrap import Identity
from conveyor.settings import Settings
from tests.conftest import bearer
from tests.test_api import assert_problem, job_count, published

NOOP = {"type": "system.noop", "payload": {}}
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def counters_of(redis_client: Redis, app: Flask, scope: str) -> list[bytes]:
    """Return the Redis keys of `scope`'s counters in `app`'s namespace."""
    prefix = app.extensions["conveyor"].settings.rate_limit_prefix
    # `<prefix>:<who>:<scope>:<amount>/<seconds>` (api.rate_windows.counter_key)
    return list(redis_client.scan_iter(f"{prefix}:*:{scope}:*"))


def window_ttl(redis_client: Redis, app: Flask, scope: str) -> int:
    """Return the seconds Redis keeps the one counter of `scope` in `app`'s namespace."""
    (key,) = counters_of(redis_client, app, scope)
    ttl: int = redis_client.ttl(key)
    return ttl


def assert_retry_after_is_the_window(response: Any, ttl_before: int, ttl_after: int) -> None:
    """Check `Retry-After` against the counter's TTL read just before and just after."""
    # Time only shrinks the TTL, so these bounds hold however slowly the test runs.
    assert 1 <= ttl_after - 1 <= int(response.headers["Retry-After"]) <= ttl_before + 1 <= 61


@pytest.mark.parametrize(
    ("blueprint", "endpoint", "method", "group"),
    [
        ("jobs", "jobs.create", "POST", "submit"),
        ("jobs", "jobs.create_batch", "POST", "submit"),
        ("files", "files.upload", "POST", "submit"),
        ("jobs", "jobs.show", "GET", "read"),
        ("queues", "queues.index", "GET", "read"),
        ("orders", "orders.daily_revenue", "GET", "read"),
        ("job_control", "job_control.cancel", "POST", "control"),
        ("job_control", "job_control.retry_many", "POST", "control"),
        ("schedules", "schedules.trigger", "POST", "control"),
        ("console", "console.retry", "POST", "control"),
        ("console", "console.bulk", "POST", "control"),
        ("console", "console.jobs", "GET", "read"),
        ("console", "console.create_key", "POST", "admin"),
        ("schedules", "schedules.create", "POST", "admin"),
        ("api_keys", "api_keys.revoke", "DELETE", "admin"),
        ("users", "users.update", "PATCH", "admin"),
        ("webhooks", "webhooks.create", "POST", "admin"),
        ("signin", "signin.login", "POST", None),
        ("health", "health.readyz", "GET", None),
        ("metrics", "metrics.metrics", "GET", None),
        ("jobs", "jobs.create", "OPTIONS", None),
        (None, "static", "GET", None),
    ],
)
def test_endpoint_groups_follow_blueprint_and_method(
    blueprint: str | None, endpoint: str, method: str, group: str | None
) -> None:
    assert endpoint_group(blueprint, endpoint, method) == group


def test_principal_limit_is_429_with_retry_after_and_writes_nothing(
    make_app: Callable[..., Flask],
    identity: Identity,
    role_tokens: dict[str, str],
    sessions: sessionmaker[Session],
    redis_client: Redis,
    settings: Settings,
) -> None:
    app = make_app(rate_limit_submit_principal="2/minute")
    client = app.test_client()
    mine = bearer(identity.token)
    for remaining in (1, 0):
        accepted = client.post("/v1/jobs", json=NOOP, headers=mine)
        assert accepted.status_code == 202
        assert accepted.headers["X-RateLimit-Limit"] == "2"
        assert accepted.headers["X-RateLimit-Remaining"] == str(remaining)
        assert "Retry-After" not in accepted.headers
    jobs, messages = job_count(sessions), published(redis_client, settings)

    before = window_ttl(redis_client, app, "principal-submit")
    refused = client.post("/v1/jobs", json=NOOP, headers=mine)
    after = window_ttl(redis_client, app, "principal-submit")
    body = assert_problem(refused, 429)
    assert body["type"].endswith("/rate-limited")
    assert "API key" in body["detail"]
    assert_retry_after_is_the_window(refused, before, after)
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.headers["X-RateLimit-Reset"]) > 0
    batch = client.post("/v1/jobs/batch", json={"jobs": [NOOP] * 3}, headers=mine)
    assert_problem(batch, 429)
    assert (job_count(sessions), published(redis_client, settings)) == (jobs, messages)

    # Another key from the same address has a bucket of its own; reads are another group.
    member = bearer(role_tokens["member"])
    assert client.post("/v1/jobs", json=NOOP, headers=member).status_code == 202
    assert client.get("/v1/jobs", headers=mine).status_code == 200


def test_headers_come_from_the_hit_without_reading_redis_again(
    make_app: Callable[..., Flask], identity: Identity
) -> None:
    app = make_app(rate_limit_read_principal="3/minute")
    client = app.test_client()
    auth = bearer(identity.token)
    responses = [client.get("/v1/jobs", headers=auth)]  # verifies the key: then it is cached
    with watch_redis() as sent:
        responses += [client.get("/v1/jobs", headers=auth) for _ in range(3)]
        # Each request: one script counting its IP and its key, answering the headers too.
        assert sent == {"round trips": 3, "EVALSHA": 3}
    *allowed, refused = responses
    for remaining, response in zip((2, 1, 0), allowed, strict=True):
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == str(remaining)
        assert 0 <= int(response.headers["X-RateLimit-Reset"]) - time.time() <= 61
    assert_problem(refused, 429)
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_ip_limit_counts_every_caller_from_one_address(
    make_app: Callable[..., Flask],
    identity: Identity,
    role_tokens: dict[str, str],
    redis_client: Redis,
) -> None:
    app = make_app(rate_limit_read_ip="3/minute")
    client = app.test_client()
    assert client.get("/v1/jobs", headers=bearer(identity.token)).status_code == 200
    assert client.get("/v1/jobs", headers=bearer(role_tokens["viewer"])).status_code == 200
    assert_problem(client.get("/v1/jobs"), 401)  # anonymous, counted all the same

    before = window_ttl(redis_client, app, "ip-read")
    refused = client.get("/v1/jobs", headers=bearer(role_tokens["member"]))
    body = assert_problem(refused, 429)
    assert "client IP" in body["detail"]
    assert_retry_after_is_the_window(refused, before, window_ttl(redis_client, app, "ip-read"))
    other = {"REMOTE_ADDR": "192.0.2.7"}
    assert (
        client.get("/v1/jobs", headers=bearer(identity.token), environ_base=other).status_code
        == 200
    )
    assert client.get("/v1/jobs", environ_base=other).status_code == 401


@pytest.mark.parametrize(
    ("trusted", "forwarded", "counted"),
    [
        (0, "203.0.113.9", "127.0.0.1"),  # no proxy trusted: the header is ignored
        (1, "203.0.113.9", "203.0.113.9"),  # one proxy appended the client
        (1, "10.6.6.6, 203.0.113.9", "203.0.113.9"),  # a client-made entry is skipped
        (2, "203.0.113.9, 10.0.0.2", "203.0.113.9"),  # two proxies
        (2, None, "127.0.0.1"),  # no header: the peer
    ],
)
def test_client_ip_trusts_only_the_configured_proxies(
    make_app: Callable[..., Flask], trusted: int, forwarded: str | None, counted: str
) -> None:
    app = make_app(trusted_proxies=trusted)
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    with app.test_request_context("/healthz", headers=headers):
        assert ip_key() == f"ip:{counted}"


def test_counters_are_keyed_by_prefix_who_scope_and_window(
    make_app: Callable[..., Flask], identity: Identity, redis_client: Redis
) -> None:
    prefix = f"rl-{uuid.uuid4().hex}"
    app = make_app(
        rate_limit_prefix=prefix,
        rate_limit_read_ip="3/minute",
        rate_limit_read_principal="5/minute;100/hour",
    )
    assert app.test_client().get("/v1/jobs", headers=bearer(identity.token)).status_code == 200
    key = f"key:{identity.api_key.id}"
    expected = {
        f"{prefix}:ip:127.0.0.1:ip-read:3/60",
        f"{prefix}:{key}:principal-read:5/60",
        f"{prefix}:{key}:principal-read:100/3600",
    }
    found = {k.decode() for k in redis_client.scan_iter(f"{prefix}:*")}
    assert found == expected
    assert all(int(redis_client.get(k) or 0) == 1 for k in expected)
    (hourly,) = parse_limits("100/hour")
    assert counter_key(prefix, key, "principal-read", hourly) in expected


def counter_value(redis_client: Redis, app: Flask, scope: str) -> int:
    """Return the one counter of `scope` in `app`'s namespace (0 when it was never hit)."""
    keys = counters_of(redis_client, app, scope)
    assert len(keys) <= 1
    return int(redis_client.get(keys[0]) or 0) if keys else 0


def test_a_request_refused_per_ip_spends_nothing_of_the_principals_budget(
    make_app: Callable[..., Flask], identity: Identity, redis_client: Redis
) -> None:
    app = make_app(rate_limit_read_ip="2/minute", rate_limit_read_principal="10/minute")
    client = app.test_client()
    auth = bearer(identity.token)
    statuses = [client.get("/v1/jobs", headers=auth).status_code for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    # Refused twice by IP, with the key cached: the principal was counted only when admitted.
    assert counter_value(redis_client, app, "principal-read") == 2
    assert counter_value(redis_client, app, "ip-read") == 4


def test_a_principal_breach_shows_its_own_window_and_detail(
    make_app: Callable[..., Flask], identity: Identity
) -> None:
    client = make_app(rate_limit_read_principal="1/minute;100/hour").test_client()
    auth = bearer(identity.token)
    allowed = client.get("/v1/jobs", headers=auth)
    refused = client.get("/v1/jobs", headers=auth)
    # Shortest window first, as long as nothing is breached; then the breached one.
    assert allowed.headers["X-RateLimit-Limit"] == "1"
    body = assert_problem(refused, 429)
    assert refused.headers["X-RateLimit-Limit"] == "1"
    assert "too many read requests from this API key: the limit is 1 per 1 minute" in body["detail"]


def test_forged_tokens_cannot_spend_someone_elses_principal_bucket(
    make_app: Callable[..., Flask], identity: Identity
) -> None:
    client = make_app(rate_limit_read_principal="2/minute").test_client()
    prefix = identity.token.split("_")[1]
    forged = bearer(f"cvk_{prefix}_not-the-secret")
    for _ in range(5):
        assert_problem(client.get("/v1/jobs", headers=forged), 401)
    statuses = [client.get("/v1/jobs", headers=bearer(identity.token)).status_code for _ in "abc"]
    assert statuses == [200, 200, 429]


def test_each_group_has_its_own_limits(
    make_app: Callable[..., Flask], identity: Identity, role_tokens: dict[str, str]
) -> None:
    app = make_app(
        rate_limit_read_principal="1/minute",
        rate_limit_control_principal="1/minute",
        rate_limit_admin_principal="",
        rate_limit_admin_ip="",
    )
    client = app.test_client()
    auth = bearer(identity.token)
    job = client.post("/v1/jobs", json=NOOP, headers=auth).get_json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).status_code == 200
    assert_problem(client.get("/v1/jobs", headers=auth), 429)
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).status_code == 200
    assert_problem(client.post(f"/v1/jobs/{job['id']}/retry", headers=auth), 429)
    # No admin limits at all: nothing refused, and no headers that would describe one.
    for n in range(3):
        created = client.post(
            "/v1/api-keys", json={"name": f"k{n}", "role": "viewer"}, headers=auth
        )
        assert created.status_code == 201
        assert not set(RATE_HEADERS) & set(created.headers.keys())
    # Probes are never limited.
    assert client.get("/healthz").status_code == 200
    assert "X-RateLimit-Limit" not in client.get("/healthz").headers


def test_rate_limits_can_be_turned_off(
    make_app: Callable[..., Flask], identity: Identity, committed: None
) -> None:
    client = make_app(
        rate_limits_enabled=False,
        rate_limit_read_principal="1/minute",
        rate_limit_read_ip="1/minute",
    ).test_client()
    for _ in range(3):
        response = client.get("/v1/jobs", headers=bearer(identity.token))
        assert response.status_code == 200
        assert "X-RateLimit-Limit" not in response.headers


def test_headers_can_be_left_out_while_429s_keep_retry_after(
    make_app: Callable[..., Flask], identity: Identity
) -> None:
    client = make_app(rate_limit_headers=False, rate_limit_read_principal="1/minute").test_client()
    auth = bearer(identity.token)
    allowed = client.get("/v1/jobs", headers=auth)
    refused = client.get("/v1/jobs", headers=auth)
    assert allowed.status_code == 200
    assert_problem(refused, 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    for response in (allowed, refused):
        assert not set(RATE_HEADERS) & set(response.headers.keys())


def test_rate_limiting_fails_open_with_a_warning_and_no_headers(
    make_app: Callable[..., Flask],
    identity: Identity,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Only the limiter's Redis is gone (a closed loopback port); broker and backend stay.
    app = make_app(
        redis_url=SecretStr("redis://127.0.0.1:1/0"),
        broker_url=settings.redis_url,
        result_backend_url=settings.redis_url,
        rate_limit_read_principal="1/minute",
        rate_limit_read_ip="1/minute",
        rate_limit_submit_principal="1/minute",
    )
    client = app.test_client()
    auth = bearer(identity.token)
    with caplog.at_level(logging.WARNING):
        responses = [client.get("/v1/jobs", headers=auth) for _ in range(3)]
        responses.append(client.post("/v1/jobs", json=NOOP, headers=auth))
    assert [r.status_code for r in responses] == [200, 200, 200, 202]
    for response in responses:
        assert not set(RATE_HEADERS) & set(response.headers.keys())
        assert "Retry-After" not in response.headers
    warnings = [r for r in caplog.records if "rate limiting is off" in r.getMessage()]
    assert warnings
    assert all(r.levelno == logging.WARNING for r in warnings)
    # That warning, and no traceback per request.
    assert not [r for r in caplog.records if r.name == "api.rate_limits" and r.exc_info]


def test_an_outage_warns_once_and_ends_by_itself(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    outage = _Outage(OUTAGE_SECONDS, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            outage.report(RedisConnectionError("refused"))
        assert outage.active()
        clock[0] = OUTAGE_SECONDS
        assert not outage.active()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "ConnectionError: refused" in caplog.records[0].getMessage()
