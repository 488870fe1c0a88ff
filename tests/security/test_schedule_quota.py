"""Beat fires nothing past a tenant's quota of unfinished jobs (triggers: test_admission.py)."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from conveyor import schedules as schedules_module
from conveyor.auth.bootstrap import Identity
from conveyor.ledger.states import JobState
from conveyor.ledger.submit import Submitted
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job
from conveyor.schedules import fire_due_schedules
from conveyor.settings import Settings
from tests.factories import job_factory, tenant_factory
from tests.test_api import job_count
from tests.test_schedules import REGISTRY as JOB_TYPES
from tests.test_schedules import make

SKIPPED = "conveyor_schedule_fires_skipped_total"


def test_beat_fires_nothing_for_a_tenant_at_its_quota(
    db_session: Session, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    counted: list[uuid.UUID] = []
    count_unfinished = schedules_module.count_unfinished

    def counting(session: Session, tenant_id: uuid.UUID, cap: int) -> int:
        counted.append(tenant_id)
        return count_unfinished(session, tenant_id, cap)

    monkeypatch.setattr(schedules_module, "count_unfinished", counting)
    busy, calm = tenant_factory(db_session, "Busy").id, tenant_factory(db_session).id
    waiting = [job_factory(db_session, busy) for _ in range(2)]
    start = datetime.now(UTC)
    # Every second, as in the issue: three of the busy tenant's (due in this order), one of
    # another tenant's.
    mine = [
        make(
            db_session,
            busy,
            start + n * timedelta(milliseconds=100),
            name=f"s{n}",
            interval_seconds=1,
        )
        for n in range(3)
    ]
    theirs = make(db_session, calm, start, name="theirs", interval_seconds=1)
    now = start + timedelta(seconds=1.5)
    skipped: Counter[str] = Counter()

    with caplog.at_level(logging.WARNING, logger="conveyor.schedules"):
        jobs = fire_due_schedules(
            UnitOfWork.around(db_session),
            JOB_TYPES,
            now,
            default_queue="q",
            misfire_grace=60,
            max_unfinished=3,
            skipped=skipped,
        )
    # Room for one more of the busy tenant's: the first due fires, the other two are skipped.
    assert sorted(schedule_of(db_session, jobs)) == sorted([mine[0].id, theirs.id])
    assert skipped == Counter(quota=2)
    assert sorted(counted) == sorted([busy, calm])  # each tenant counted once per pass
    warned = [r.getMessage() for r in caplog.records if "quota" in r.getMessage()]
    assert [str(s.id) in line for s, line in zip(mine[1:], warned, strict=True)] == [True, True]
    # A skipped occurrence is passed over like a missed one: each waits for its next.
    assert all(now < s.next_run_at <= now + timedelta(seconds=1) for s in (*mine, theirs))

    # Once the tenant's jobs drain, its schedules fire again.
    db_session.execute(
        update(Job)
        .where(Job.id.in_([j.id for j in waiting]))
        .values(state=JobState.SUCCEEDED, finished_at=now)
    )
    later = now + timedelta(seconds=1)
    refired = fire_due_schedules(
        UnitOfWork.around(db_session),
        JOB_TYPES,
        later,
        default_queue="q",
        misfire_grace=60,
        max_unfinished=3,
    )
    # The one fired before is still unfinished: room for two of the three.
    assert sorted(schedule_of(db_session, refired)) == sorted([mine[0].id, mine[1].id, theirs.id])


def schedule_of(session: Session, jobs: list[Submitted]) -> list[uuid.UUID | None]:
    """Return the schedule each fired job came from."""
    return [session.get_one(Job, job.id).schedule_id for job in jobs]


def test_the_housekeeper_applies_the_quota_from_settings_and_counts_skips(
    settings: Settings, identity: Identity, sessions: sessionmaker[Session]
) -> None:
    from worker.app import create_celery_app
    from worker.housekeeping import Housekeeper

    with sessions.begin() as session:
        job_factory(session, identity.tenant.id)
        start = datetime.now(UTC) - timedelta(seconds=2)
        schedule_id = make(session, identity.tenant.id, start, interval_seconds=1).id
    before = REGISTRY.get_sample_value(SKIPPED, {"reason": "quota"}) or 0.0
    beat = Housekeeper.for_app(
        create_celery_app(settings.model_copy(update={"tenant_max_unfinished_jobs": 1}))
    )
    try:
        assert beat.fire_schedules() == 0
    finally:
        beat.services.engine.dispose()
    assert REGISTRY.get_sample_value(SKIPPED, {"reason": "quota"}) == before + 1
    assert job_count(sessions) == 1
    with sessions() as session:
        schedule = session.get_one(schedules_module.Schedule, schedule_id)
        assert schedule.next_run_at > datetime.now(UTC) - timedelta(seconds=1)
