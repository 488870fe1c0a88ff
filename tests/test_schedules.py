"""Schedules: timing across DST, policies, the API, and exactly one job per occurrence."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job, Schedule
from conveyor.registry import load_job_types
from conveyor.schedules import ScheduleSpec, create_schedule, fire_due_schedules, next_occurrence
from conveyor.settings import Settings
from tests.conftest import wait_for
from tests.test_api import assert_problem

BERLIN = ZoneInfo("Europe/Berlin")
REGISTRY = load_job_types(["conveyor.jobtypes.system"])


def spec(**fields: Any) -> ScheduleSpec:
    return ScheduleSpec.model_validate({"name": "nightly", "job_type": "system.noop", **fields})


def make(session: Session, tenant_id: uuid.UUID, now: datetime, **fields: Any) -> Schedule:
    return create_schedule(session, REGISTRY, tenant_id, spec(**fields), default_queue="q", now=now)


@pytest.mark.parametrize(
    ("day", "expected_local"),
    [
        # Spring forward: 02:30 does not exist on 29 March; cron semantics run it at 03:00.
        (datetime(2026, 3, 28, 12, tzinfo=BERLIN), ["03-29 03:00+02", "03-30 02:30+02"]),
        # Fall back: 02:30 happens twice on 25 October; it runs once.
        (datetime(2026, 10, 24, 12, tzinfo=BERLIN), ["10-25 02:30+02", "10-26 02:30+01"]),
    ],
)
def test_a_daily_0230_job_across_dst_changes(day: datetime, expected_local: list[str]) -> None:
    schedule = Schedule(cron="30 2 * * *", timezone="Europe/Berlin")
    first = next_occurrence(schedule, day.astimezone(UTC))
    second = next_occurrence(schedule, first)
    got = [t.astimezone(BERLIN).strftime("%m-%d %H:%M%z")[:-2] for t in (first, second)]
    assert got == expected_local
    assert first.tzinfo == UTC


def test_interval_occurrences_stay_on_their_grid() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    schedule = Schedule(interval_seconds=10, next_run_at=start)
    assert next_occurrence(schedule, start - timedelta(seconds=3)) == start
    assert next_occurrence(schedule, start) == start + timedelta(seconds=10)
    assert next_occurrence(schedule, start + timedelta(seconds=95)) == start + timedelta(
        seconds=100
    )


def fired(session: Session, now: datetime, grace: float = 60) -> list[Job]:
    """Fire what is due; return the rows of the jobs fired, as the ledger has them."""
    unit = UnitOfWork.around(session)
    jobs = fire_due_schedules(unit, REGISTRY, now, default_queue="q", misfire_grace=grace)
    return [session.get_one(Job, job.id) for job in jobs]


def test_firing_on_time_and_the_misfire_policies(
    db_session: Session, identity_tenant: uuid.UUID
) -> None:
    with freeze_time("2026-05-01 09:59:30+00:00"):
        now = datetime.now(UTC)
        skip = make(db_session, identity_tenant, now, name="skip", cron="0 * * * *")
        once = make(
            db_session,
            identity_tenant,
            now,
            name="once",
            cron="0 * * * *",
            misfire_policy="run_once",
        )
        assert skip.next_run_at == datetime(2026, 5, 1, 10, tzinfo=UTC)
    with freeze_time("2026-05-01 10:00:01+00:00"):
        jobs = fired(db_session, datetime.now(UTC))
        assert sorted(j.schedule_id for j in jobs) == sorted([skip.id, once.id])
        assert all(j.schedule_occurrence == datetime(2026, 5, 1, 10, tzinfo=UTC) for j in jobs)
        assert skip.next_run_at == datetime(2026, 5, 1, 11, tzinfo=UTC)
    # Beat was down from 10:00 to 14:30: four occurrences missed.
    with freeze_time("2026-05-01 14:30:00+00:00"):
        jobs = fired(db_session, datetime.now(UTC))
        assert [j.schedule_id for j in jobs] == [once.id]  # one run for all it missed
        assert jobs[0].schedule_occurrence == datetime(2026, 5, 1, 14, tzinfo=UTC)
        assert skip.next_run_at == datetime(2026, 5, 1, 15, tzinfo=UTC)
        assert fired(db_session, datetime.now(UTC)) == []


def test_overlap_skip_waits_for_the_previous_job(
    db_session: Session, identity_tenant: uuid.UUID
) -> None:
    with freeze_time("2026-05-01 10:00:00+00:00") as frozen:
        schedule = make(
            db_session,
            identity_tenant,
            datetime.now(UTC),
            interval_seconds=60,
            overlap_policy="skip",
        )
        frozen.tick(60)
        (first,) = fired(db_session, datetime.now(UTC))
        frozen.tick(60)
        assert fired(db_session, datetime.now(UTC)) == []  # the first is still queued
        first.state = "succeeded"
        db_session.flush()
        frozen.tick(60)
        assert len(fired(db_session, datetime.now(UTC))) == 1
        assert schedule.last_job_id != first.id


def test_two_senders_of_one_occurrence_create_one_job(
    committed: None, sessions: sessionmaker[Session], identity: Identity
) -> None:
    start = datetime.now(UTC)
    with sessions.begin() as session:
        schedule_id = make(
            session, identity.tenant.id, start - timedelta(seconds=2), interval_seconds=1
        ).id
    occurrence = start - timedelta(seconds=1)
    # Two beats that both think they lead fire the same occurrence.
    for _ in range(2):
        with sessions.begin() as session:
            schedule = session.get_one(Schedule, schedule_id)
            from conveyor.schedules import fire

            unit = UnitOfWork.around(session)
            fire(unit, REGISTRY, schedule, default_queue="q", now=start, occurrence=occurrence)
    with sessions() as session:
        count = session.scalar(
            select(func.count()).where(
                Job.schedule_id == schedule_id, Job.schedule_occurrence == occurrence
            )
        )
    assert count == 1


@pytest.fixture
def identity_tenant(db_session: Session) -> uuid.UUID:
    from tests.factories import tenant_factory

    return tenant_factory(db_session).id


def test_schedule_api_round_trip(client: Any, auth: dict[str, str], settings: Settings) -> None:
    body = {
        "name": "hourly-noop",
        "job_type": "system.noop",
        "cron": "0 * * * *",
        "timezone": "Europe/Berlin",
        "options": {"priority": 5, "max_attempts": 2, "queue": settings.default_queue},
    }
    created = client.post("/v1/schedules", json=body, headers=auth)
    assert created.status_code == 201
    schedule = created.get_json()
    assert schedule["next_run_at"]
    assert (schedule["last_job_id"], schedule["last_job_state"]) == (None, None)
    assert created.headers["Location"] == f"/v1/schedules/{schedule['id']}"
    listed = client.get("/v1/schedules", headers=auth).get_json()["items"]
    assert [s["name"] for s in listed] == ["hourly-noop"]
    patched = client.patch(
        f"/v1/schedules/{schedule['id']}", json={"interval_seconds": 30}, headers=auth
    ).get_json()
    assert (patched["cron"], patched["timezone"], patched["interval_seconds"]) == (None, None, 30)
    job = client.post(f"/v1/schedules/{schedule['id']}/trigger", headers=auth)
    assert job.status_code == 202
    assert job.get_json()["schedule_id"] == schedule["id"]
    assert job.get_json()["priority"] == 5
    shown = client.get(f"/v1/schedules/{schedule['id']}", headers=auth).get_json()
    assert (shown["last_job_id"], shown["last_job_state"]) == (job.get_json()["id"], "queued")
    assert client.delete(f"/v1/schedules/{schedule['id']}", headers=auth).status_code == 204
    assert_problem(client.get(f"/v1/schedules/{schedule['id']}", headers=auth), 404)
    kept = client.get(f"/v1/jobs/{job.get_json()['id']}", headers=auth).get_json()
    assert kept["schedule_id"] is None


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"cron": "61 * * * *"}, 422, "cron"),
        ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, 422, "timezone"),
        ({"interval_seconds": 0}, 422, "interval_seconds"),
        ({}, 422, "body"),
        ({"cron": "0 * * * *", "interval_seconds": 5}, 422, "body"),
        ({"interval_seconds": 5, "job_type": "nope"}, 422, "job_type"),
        (
            {"interval_seconds": 5, "job_type": "system.sleep", "payload": {"seconds": -1}},
            422,
            "payload.seconds",
        ),
        ({"interval_seconds": 5, "options": {"queue": "elsewhere"}}, 422, "options.queue"),
        ({"interval_seconds": 5, "options": {"priority": 12}}, 422, "options.priority"),
        ({"interval_seconds": 5, "options": {"ttl_seconds": 1e308}}, 422, "options.ttl_seconds"),
        ({"interval_seconds": 5, "misfire_policy": "later"}, 422, "misfire_policy"),
    ],
)
def test_bad_schedules_are_refused_and_nothing_is_written(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    body: dict[str, Any],
    status: int,
    field: str,
) -> None:
    full = {"name": "bad", "job_type": "system.noop", **body}
    problem = assert_problem(client.post("/v1/schedules", json=full, headers=auth), status)
    assert field in [e["field"] for e in problem["errors"]], problem
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Schedule)) == 0


def test_a_duplicate_name_is_409(client: Any, auth: dict[str, str]) -> None:
    body = {"name": "dup", "job_type": "system.noop", "interval_seconds": 60}
    assert client.post("/v1/schedules", json=body, headers=auth).status_code == 201
    problem = assert_problem(client.post("/v1/schedules", json=body, headers=auth), 409)
    assert problem["errors"][0]["field"] == "name"


def test_two_beats_fire_every_occurrence_once_and_survive_the_leader(
    settings: Settings, identity: Identity, sessions: sessionmaker[Session]
) -> None:
    from worker.app import create_celery_app
    from worker.housekeeping import Housekeeper

    fast = settings.model_copy(
        update={"schedule_interval": 0.1, "promote_interval": 0.2, "reap_interval": 5}
    )
    with sessions.begin() as session:
        schedule = make(session, identity.tenant.id, datetime.now(UTC), interval_seconds=1)
        schedule.options = {"queue": settings.default_queue}
    beats = [Housekeeper.for_app(create_celery_app(fast)) for _ in range(2)]
    for beat in beats:
        beat.start()

    def occurrences() -> list[datetime]:
        with sessions() as session:
            return list(
                session.scalars(
                    select(Job.schedule_occurrence).where(Job.schedule_id == schedule.id)
                )
            )

    try:
        wait_for(lambda: len(occurrences()) >= 10, timeout=30)
        leader = next(b for b in beats if b.stats.get("fired"))
        follower = next(b for b in beats if b is not leader)
        leader.stop()  # as if killed: its lock connection closes
        killed_at = datetime.now(UTC)
        wait_for(lambda: len(occurrences()) >= 21, timeout=30)
        assert follower.stats.get("fired", 0) >= 5
    finally:
        for beat in beats:
            beat.stop()
            beat.services.engine.dispose()
    seen = sorted(occurrences())
    assert len(seen) == len(set(seen))  # each occurrence exactly once
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(seen)]
    assert max(gaps) <= 3, gaps  # the follower took over within a few seconds
    assert any(t > killed_at for t in seen)
