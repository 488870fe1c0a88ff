"""Admission: the jobs a request adds are held to the tenant's quota of unfinished jobs.

Checked in the views that add jobs, once their input is valid: after the rate limits, the
caller's permission and the body's syntax and fields, before anything is written.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask
from redis import Redis
from sqlalchemy import event, update
from sqlalchemy.orm import Session, sessionmaker

from conveyor import quota as quota_module
from conveyor.auth.bootstrap import Identity
from conveyor.errors import QuotaExceeded, ValidationFailed
from conveyor.ledger.states import JobState
from conveyor.models import Job
from conveyor.quota import DRAIN_SAMPLE, DrainRate, TenantQuota
from conveyor.settings import Settings
from tests.conftest import bearer
from tests.factories import job_factory
from tests.test_api import assert_problem, job_count, published
from tests.test_identity import login, register

NOOP = {"type": "system.noop", "payload": {}}


def finish_jobs(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, count: int, ago: timedelta
) -> None:
    """Record `count` of the tenant's jobs as finished `ago`."""
    with sessions.begin() as session:
        ids = [job_factory(session, tenant_id).id for _ in range(count)]
        session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(state=JobState.SUCCEEDED, finished_at=datetime.now(UTC) - ago)
        )


def test_quota_refuses_submits_with_retry_after_from_the_drain_rate(
    make_app: Callable[..., Flask],
    identity: Identity,
    sessions: sessionmaker[Session],
    redis_client: Redis,
    settings: Settings,
) -> None:
    # 30 jobs finished in the 300 s window: the tenant drains 0.1 jobs a second.
    finish_jobs(sessions, identity.tenant.id, 30, ago=timedelta(seconds=60))
    finish_jobs(sessions, identity.tenant.id, 50, ago=timedelta(seconds=900))  # too long ago
    app = make_app(
        tenant_max_unfinished_jobs=3,
        tenant_quota_refresh_seconds=0,
        tenant_drain_window_seconds=300,
    )
    client = app.test_client()
    auth = bearer(identity.token)
    assert client.post("/v1/jobs/batch", json={"jobs": [NOOP] * 2}, headers=auth).status_code == 202
    assert client.post("/v1/jobs", json=NOOP, headers=auth).status_code == 202
    jobs, messages = job_count(sessions), published(redis_client, settings)

    refused = client.post("/v1/jobs", json=NOOP, headers=auth)
    body = assert_problem(refused, 429)
    assert body["type"].endswith("/quota-exceeded")
    assert refused.headers["Retry-After"] == str(math.ceil(1 / (30 / 300)))  # 10 s
    batch = client.post("/v1/jobs/batch", json={"jobs": [NOOP] * 2}, headers=auth)
    assert_problem(batch, 429)
    assert batch.headers["Retry-After"] == "20"
    assert (job_count(sessions), published(redis_client, settings)) == (jobs, messages)
    # A batch larger than the whole quota could never fit: no point in retrying.
    too_big = client.post("/v1/jobs/batch", json={"jobs": [NOOP] * 4}, headers=auth)
    assert_problem(too_big, 422)

    # A finished job makes room for one more.
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == (client.get("/v1/jobs?limit=1", headers=auth).json["items"][0]["id"]))
            .values(state=JobState.SUCCEEDED, finished_at=datetime.now(UTC))
        )
    assert client.post("/v1/jobs", json=NOOP, headers=auth).status_code == 202


def test_quota_with_nothing_drained_suggests_a_minute(
    make_app: Callable[..., Flask], identity: Identity
) -> None:
    client = make_app(tenant_max_unfinished_jobs=1).test_client()
    auth = bearer(identity.token)
    assert client.post("/v1/jobs", json=NOOP, headers=auth).status_code == 202
    refused = client.post("/v1/jobs", json=NOOP, headers=auth)
    assert_problem(refused, 429)
    assert refused.headers["Retry-After"] == "60"


def test_quota_leaves_other_tenants_viewers_and_reads_alone(
    make_app: Callable[..., Flask], identity: Identity, role_tokens: dict[str, str]
) -> None:
    client = make_app(tenant_max_unfinished_jobs=1).test_client()
    auth = bearer(identity.token)
    assert client.post("/v1/jobs", json=NOOP, headers=auth).status_code == 202
    assert_problem(client.post("/v1/jobs", json=NOOP, headers=auth), 429)
    # A viewer may not submit at all: that, not the quota, is its answer.
    assert_problem(client.post("/v1/jobs", json=NOOP, headers=bearer(role_tokens["viewer"])), 403)
    assert client.get("/v1/jobs", headers=auth).status_code == 200
    assert register(client, "owner@other.example.com").status_code == 201
    theirs = bearer(login(client, "owner@other.example.com").get_json()["access_token"])
    assert client.post("/v1/jobs", json=NOOP, headers=theirs).status_code == 202


def test_admission_comes_after_validation_so_a_bad_request_never_counts(
    make_app: Callable[..., Flask], identity: Identity, sessions: sessionmaker[Session]
) -> None:
    # Counted once a minute: what the process admits meanwhile adds to its tally.
    client = make_app(tenant_max_unfinished_jobs=1, tenant_quota_refresh_seconds=60).test_client()
    auth = bearer(identity.token)
    jobs = job_count(sessions)
    refused_early = [
        (client.post("/v1/jobs", json={"payload": {}}, headers=auth), 422),  # no type
        (client.post("/v1/jobs", json={"type": "no.such.type"}, headers=auth), 422),
        (client.post("/v1/jobs", json={**NOOP, "payload": {"x": 1}}, headers=auth), 422),
        (client.post("/v1/jobs", json=NOOP, headers={**auth, "Idempotency-Key": ""}), 422),
        (client.post("/v1/jobs/batch", json={"jobs": [NOOP, {"type": "nope"}]}, headers=auth), 422),
        (client.post("/v1/jobs", data="{", content_type="application/json", headers=auth), 400),
        (client.post("/v1/jobs", data="type=x", headers=auth), 415),
    ]
    for response, status in refused_early:
        assert_problem(response, status)
    # None of them took the one place the quota has.
    assert client.post("/v1/jobs", json=NOOP, headers=auth).status_code == 202
    # At the quota, a bad request is still told what is wrong with it, not to wait.
    for response, status in [
        (client.post("/v1/jobs", json={"type": "no.such.type"}, headers=auth), 422),
        (client.post("/v1/jobs/batch", json={"jobs": [{"type": "nope"}]}, headers=auth), 422),
        (client.post("/v1/jobs", data="{", content_type="application/json", headers=auth), 400),
    ]:
        assert_problem(response, status)
    assert_problem(client.post("/v1/jobs", json=NOOP, headers=auth), 429)
    assert job_count(sessions) == jobs + 1


def test_an_idempotent_replay_is_answered_even_at_the_quota(
    make_app: Callable[..., Flask],
    identity: Identity,
    sessions: sessionmaker[Session],
    redis_client: Redis,
    settings: Settings,
) -> None:
    client = make_app(tenant_max_unfinished_jobs=1, tenant_quota_refresh_seconds=60).test_client()
    auth = bearer(identity.token)
    once = {**auth, "Idempotency-Key": "order-1"}
    first = client.post("/v1/jobs", json=NOOP, headers=once)
    assert first.status_code == 202
    jobs, messages = job_count(sessions), published(redis_client, settings)
    # The tenant is at its quota now, with this very job: its replay adds nothing, so it
    # gets the original (and does not count against the quota: the next is still one over).
    for _ in range(2):
        replay = client.post("/v1/jobs", json=NOOP, headers=once)
        assert replay.status_code == 200
        assert replay.get_json()["id"] == first.get_json()["id"]
    refused = client.post("/v1/jobs", json=NOOP, headers={**auth, "Idempotency-Key": "order-2"})
    body = assert_problem(refused, 429)
    assert body["type"].endswith("/quota-exceeded")
    # The refusal gave the key back: the same request is admitted once there is room.
    assert (job_count(sessions), published(redis_client, settings)) == (jobs, messages)
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == first.get_json()["id"])
            .values(state=JobState.SUCCEEDED, finished_at=datetime.now(UTC))
        )
    later = make_app(tenant_max_unfinished_jobs=1).test_client()
    retried = later.post("/v1/jobs", json=NOOP, headers={**auth, "Idempotency-Key": "order-2"})
    assert retried.status_code == 202


def test_a_trigger_is_held_to_the_quota_like_a_submit(
    make_app: Callable[..., Flask],
    identity: Identity,
    role_tokens: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    client = make_app(tenant_max_unfinished_jobs=1, tenant_quota_refresh_seconds=0).test_client()
    auth = bearer(identity.token)
    body = {
        "name": "hourly",
        "job_type": "system.noop",
        "cron": "0 * * * *",
        "options": {"queue": settings.default_queue},
    }
    created = client.post("/v1/schedules", json=body, headers=auth)
    assert created.status_code == 201
    trigger = f"/v1/schedules/{created.get_json()['id']}/trigger"
    with sessions.begin() as session:
        blocking = job_factory(session, identity.tenant.id).id
    jobs = job_count(sessions)

    refused = assert_problem(client.post(trigger, headers=auth), 429)
    assert refused["type"].endswith("/quota-exceeded")
    operator = client.post(trigger, headers=bearer(role_tokens["operator"]))
    assert_problem(operator, 429)
    assert "Retry-After" in operator.headers
    # A member may not trigger at all: that, not the quota, is its answer.
    assert_problem(client.post(trigger, headers=bearer(role_tokens["member"])), 403)
    # No such schedule: nothing to add, so nothing to hold back.
    assert_problem(client.post(f"/v1/schedules/{uuid.uuid4()}/trigger", headers=auth), 404)
    assert job_count(sessions) == jobs

    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == blocking)
            .values(state=JobState.SUCCEEDED, finished_at=datetime.now(UTC))
        )
    assert client.post(trigger, headers=auth).status_code == 202
    assert job_count(sessions) == jobs + 1


def queries(session: Session) -> list[str]:
    """Return a list that records each statement `session` executes from now on."""
    seen: list[str] = []
    event.listen(session, "do_orm_execute", lambda state: seen.append(str(state.statement)))
    return seen


def test_quota_counts_a_tenant_once_per_refresh(
    identity: Identity, sessions: sessionmaker[Session]
) -> None:
    clock = [0.0]
    quota = TenantQuota(3, refresh=1.0, drain_window=300, clock=lambda: clock[0])
    tenant, now = identity.tenant.id, datetime.now(UTC)
    with sessions() as session:
        ran = queries(session)
        quota.admit(session, tenant, 1, now)
        quota.admit(session, tenant, 2, now)
        assert len(ran) == 1  # counted once; the second admit adds to that count
        with pytest.raises(QuotaExceeded):
            quota.admit(session, tenant, 1, now)
        assert len(ran) == 2  # no recount within the refresh, only the drain rate
        clock[0] = 1.0
        quota.admit(session, tenant, 3, now)  # nothing was written: a fresh count finds room
        assert len(ran) == 3
        with pytest.raises(ValidationFailed):
            quota.admit(session, tenant, 4, now)
        TenantQuota(0, refresh=1.0, drain_window=300).admit(session, tenant, 10**6, now)
        assert len(ran) == 3


def test_a_busy_tenants_drain_rate_comes_from_its_latest_finishes(
    identity: Identity, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quota_module, "DRAIN_SAMPLE", 4)
    now = datetime.now(UTC)
    for seconds in (2, 4, 6, 8, 10, 200):
        finish_jobs(sessions, identity.tenant.id, 1, ago=timedelta(seconds=seconds))
    with sessions() as session:
        # The latest 4 finished within 8 s, far less than the 300 s window: 0.5 jobs/s.
        busy = quota_module.drain_rate(session, identity.tenant.id, now, 300)
        assert busy.finished == 4
        assert busy.seconds == pytest.approx(8, abs=0.5)
        monkeypatch.setattr(quota_module, "DRAIN_SAMPLE", 1000)
        assert quota_module.drain_rate(session, identity.tenant.id, now, 300) == DrainRate(6, 300)


@pytest.mark.parametrize(
    ("rate", "excess", "wait"),
    [
        (DrainRate(30, 300.0), 1, 10),
        (DrainRate(30, 300.0), 7, 70),
        (DrainRate(3, 300.0), 1, 100),
        (DrainRate(DRAIN_SAMPLE, 0.5), 1, 1),  # fast drains still wait a second
        (DrainRate(1, 300.0), 1000, 3600),  # and slow ones at most an hour
        (DrainRate(0, 300.0), 5, 60),  # nothing drained: try again in a minute
    ],
)
def test_retry_after_is_the_excess_over_the_drain_rate(
    rate: DrainRate, excess: int, wait: int
) -> None:
    assert rate.retry_after(excess) == wait
