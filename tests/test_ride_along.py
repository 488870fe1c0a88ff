"""The status poll's live view rides in the rate limiter's round trip (`ride_along`).

A poll from a cached API key costs one Redis round trip, counters and live view together,
and no database one; a refused poll never gets what was read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from pydantic import SecretStr
from redis import Redis
from redis.client import Pipeline
from sqlalchemy.orm import Session, sessionmaker

from api import jobs as jobs_module
from api.rate_limits import Receiver, ride_along
from bench.roundtrips import watch, watch_redis
from conveyor.auth.bootstrap import Identity
from conveyor.auth.keys import authenticate_api_key
from conveyor.settings import Settings
from tests.conftest import bearer
from tests.factories import job_factory, other_tenant
from tests.test_api import assert_problem
from tests.test_rate_limits import NOOP, RATE_HEADERS, counter_value


def test_a_cached_key_is_counted_per_ip_and_principal_in_one_round_trip(
    make_app: Callable[..., Flask], identity: Identity, redis_client: Redis
) -> None:
    auth = bearer(identity.token)
    job = make_app().test_client().post("/v1/jobs", json=NOOP, headers=auth).get_json()
    # A fresh process: its key cache is cold, so the first poll verifies the key first.
    # Hit by hit (no leases, api/rate_leases.py): the counters below are exact.
    app = make_app(rate_limit_read_principal="5/minute", rate_limit_lease=1)
    client = app.test_client()
    statements = watch(app.extensions["conveyor"].engine)
    with watch_redis() as sent:
        first = client.get(f"/v1/jobs/{job['id']}", headers=auth)
        sent.clear()
        statements.clear()
        # The key cache vouches for the caller now: both counters in one script, and the
        # job's live view and progress in the same pipeline, and nothing else: the view
        # reads nothing more, from Redis or the database.
        second = client.get(f"/v1/jobs/{job['id']}", headers=auth)
        assert sent == {"round trips": 1, "EVALSHA": 1, "HMGET": 1, "GET": 1}
        assert not statements
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.get_json() == second.get_json()
    assert second.get_json()["state"] == "queued"
    assert first.headers["X-RateLimit-Remaining"] == "4"
    assert second.headers["X-RateLimit-Limit"] == "5"
    assert second.headers["X-RateLimit-Remaining"] == "3"
    assert counter_value(redis_client, app, "ip-read") == 2
    assert counter_value(redis_client, app, "principal-read") == 2


def test_a_refused_poll_reveals_nothing_and_never_reads_the_job(
    make_app: Callable[..., Flask], identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(rate_limit_read_principal="1/minute")
    client = app.test_client()
    auth = bearer(identity.token)
    job = client.post("/v1/jobs", json=NOOP, headers=auth).get_json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).status_code == 200
    reads: list[Any] = []
    read_view = jobs_module.read_view

    def reading(*args: Any) -> dict[str, Any]:
        reads.append(args[-1])  # what the limiter's round trip handed the view
        return read_view(*args)

    monkeypatch.setattr(jobs_module, "read_view", reading)
    statements = watch(app.extensions["conveyor"].engine)
    with watch_redis() as sent:
        refused = client.get(f"/v1/jobs/{job['id']}", headers=auth)
        # The live view was read with the counters, and then dropped with the request.
        assert sent == {"round trips": 1, "EVALSHA": 1, "HMGET": 1, "GET": 1}
    assert reads == []
    assert not statements
    body = assert_problem(refused, 429)
    assert "Retry-After" in refused.headers
    assert not {"state", "payload", "queue", "progress"} & set(body)
    assert "system.noop" not in refused.get_data(as_text=True)
    # Nothing of the refused poll lingers for the next request's view (a cold key cache:
    # nothing rides along with it).
    next_app = make_app()
    assert next_app.test_client().get(f"/v1/jobs/{job['id']}", headers=auth).status_code == 200
    assert reads == [None]


def test_another_tenants_job_is_404_through_the_prefetched_snapshot(
    make_app: Callable[..., Flask],
    identity: Identity,
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    client = make_app().test_client()
    job = client.post("/v1/jobs", json=NOOP, headers=bearer(identity.token)).get_json()
    other = other_tenant(sessions, settings)
    stranger = bearer(other.token)
    assert_problem(client.get(f"/v1/jobs/{job['id']}", headers=stranger), 404)
    with watch_redis() as sent:
        # Warm now: the snapshot comes with the counters, and is refused as another tenant's.
        refused = client.get(f"/v1/jobs/{job['id']}", headers=stranger)
        assert sent == {"round trips": 1, "EVALSHA": 1, "HMGET": 1, "GET": 1}
    body = assert_problem(refused, 404)
    assert "system.noop" not in json.dumps(body)


def test_a_poll_after_redis_lost_the_counting_script_loads_it_and_counts_once(
    make_app: Callable[..., Flask], identity: Identity, redis_client: Redis
) -> None:
    app = make_app(rate_limit_read_principal="5/minute")
    client = app.test_client()
    auth = bearer(identity.token)
    job = client.post("/v1/jobs", json=NOOP, headers=auth).get_json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).status_code == 200
    # What a Redis restart without persistence of scripts looks like to a running process.
    redis_client.script_flush()
    response = client.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert response.status_code == 200
    assert response.get_json()["id"] == job["id"]
    assert response.headers["X-RateLimit-Remaining"] == "3"
    assert counter_value(redis_client, app, "ip-read") == 2
    assert counter_value(redis_client, app, "principal-read") == 2


def test_a_redis_failure_in_the_polls_round_trip_fails_open_and_reads_the_ledger(
    make_app: Callable[..., Flask],
    identity: Identity,
    settings: Settings,
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Counters and snapshots on one Redis that is gone (a closed loopback port).
    app = make_app(redis_url=SecretStr("redis://127.0.0.1:1/0"), broker_url=settings.redis_url)
    with sessions.begin() as session:
        job = job_factory(session, identity.tenant.id)
        principal = authenticate_api_key(
            session, settings.secret_key.get_secret_value(), identity.token, datetime.now(UTC)
        )
    # A warm key cache, so that the first request already reads the snapshot with its counters.
    app.extensions["conveyor"].key_cache.put(identity.token, principal)
    with caplog.at_level(logging.WARNING):
        response = app.test_client().get(f"/v1/jobs/{job.id}", headers=bearer(identity.token))
    assert response.status_code == 200
    assert response.get_json()["state"] == "queued"
    assert not set(RATE_HEADERS) & set(response.headers.keys())
    warnings = [r for r in caplog.records if "rate limiting is off" in r.getMessage()]
    assert len(warnings) == 1


def test_on_separate_redis_the_counters_and_the_snapshot_take_a_round_trip_each(
    make_app: Callable[..., Flask], identity: Identity, settings: Settings
) -> None:
    # Another database of the same server is another Redis to the API.
    other = settings.redis_url.get_secret_value().rsplit("/", 1)[0] + "/1"
    app = make_app(result_backend_url=SecretStr(other))
    client = app.test_client()
    auth = bearer(identity.token)
    job = client.post("/v1/jobs", json=NOOP, headers=auth).get_json()
    with watch_redis() as sent:
        response = client.get(f"/v1/jobs/{job['id']}", headers=auth)
        assert sent == {"round trips": 2, "EVALSHA": 1, "HMGET": 1, "GET": 1}
    assert response.get_json()["state"] == "queued"


def echo(word: bytes, received: list[Sequence[Any]]) -> Callable[[Pipeline], Receiver]:
    """Return a passenger that sends ECHO `word` and records the replies it receives."""

    def passenger(pipe: Pipeline) -> Receiver:
        pipe.echo(word)
        return received.append

    return passenger


def test_an_endpoints_commands_ride_along_and_reach_it_only_when_admitted(
    make_app: Callable[..., Flask], identity: Identity
) -> None:
    # Hit by hit (no leases, api/rate_leases.py): every round trip below is the limiter's.
    app = make_app(rate_limit_read_principal="2/minute", rate_limit_lease=1)
    client = app.test_client()
    auth = bearer(identity.token)
    received: list[Sequence[Any]] = []
    assert ride_along(
        app, "jobs.index", app.extensions["conveyor"].live.redis, echo(b"hi", received)
    )
    assert_problem(client.get("/v1/jobs"), 401)  # connects the limiter to Redis
    with watch_redis() as sent:
        # Not yet vouched for by the key cache: counted per IP, then per verified key.
        assert client.get("/v1/jobs", headers=bearer(identity.token)).status_code == 200
        assert sent == {"round trips": 2, "EVALSHA": 2}
        assert received == []
        sent.clear()
        # Cached now: one round trip carries the counters and the endpoint's command.
        assert client.get("/v1/jobs", headers=auth).status_code == 200
        assert sent == {"round trips": 1, "EVALSHA": 1, "ECHO": 1}
        assert received == [[b"hi"]]
        sent.clear()
        # Over the principal's limit: the command rode, its reply went nowhere.
        assert_problem(client.get("/v1/jobs", headers=auth), 429)
        assert sent == {"round trips": 1, "EVALSHA": 1, "ECHO": 1}
        assert received == [[b"hi"]]
    # Another endpoint (of the same group, so refused too) carries nothing.
    with watch_redis() as sent:
        assert_problem(client.get("/v1/job-types", headers=auth), 429)
        assert sent == {"round trips": 1, "EVALSHA": 1}


def test_commands_for_another_redis_do_not_ride_along(
    make_app: Callable[..., Flask], settings: Settings
) -> None:
    app = make_app()
    other = settings.redis_url.get_secret_value().rsplit("/", 1)[0] + "/1"
    assert not ride_along(app, "jobs.index", Redis.from_url(other), echo(b"hi", []))
    assert ride_along(
        app, "jobs.index", Redis.from_url(settings.redis_url.get_secret_value()), echo(b"hi", [])
    )
