"""The lifecycle core on real PostgreSQL: submit, claim, finish, promote."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.errors import NotFound, UnknownJobType, ValidationFailed
from conveyor.jobs import (
    ClaimedJob,
    beat_heartbeats,
    claim_job,
    fail_job,
    mark_published,
    promote_due_jobs,
    reap_stale_jobs,
    retry_delay,
    stale_queued_jobs,
    succeed_job,
    succeed_job_quietly,
)
from conveyor.models import Job, JobEvent
from conveyor.queries import get_job
from conveyor.registry import RetryPolicy, load_job_types
from conveyor.states import JobState
from tests.factories import job_factory, tenant_factory

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def events(session: Session, job: Job) -> list[tuple[str | None, str, int]]:
    rows = session.execute(
        select(JobEvent.from_state, JobEvent.to_state, JobEvent.attempt)
        .where(JobEvent.job_id == job.id)
        .order_by(JobEvent.id)
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_submit_writes_a_queued_job_and_its_first_event(db_session: Session) -> None:
    job = job_factory(db_session, type_name="system.sleep", payload={"seconds": 1})
    assert job.state == JobState.QUEUED
    assert job.payload == {"seconds": 1.0}
    assert job.attempt == 0
    assert events(db_session, job) == [(None, "queued", 0)]


def test_submit_rejects_unknown_type_and_bad_payload(db_session: Session) -> None:
    with pytest.raises(UnknownJobType):
        job_factory(db_session, type_name="nope")
    with pytest.raises(ValidationFailed) as info:
        job_factory(db_session, type_name="system.sleep", payload={"seconds": -1})
    assert info.value.errors[0]["field"] == "payload.seconds"
    assert db_session.scalar(select(func.count()).select_from(Job)) == 0


def test_claim_takes_a_queued_job_once(db_session: Session) -> None:
    job = job_factory(db_session)
    claimed = claim_job(db_session, job.id, "w1", NOW)
    assert claimed is not None
    assert claimed.attempt == 1
    assert claim_job(db_session, job.id, "w2", NOW) is None
    db_session.refresh(job)
    assert (job.state, job.worker, job.started_at) == ("running", "w1", NOW)


def test_succeed_is_guarded_by_state_and_attempt(db_session: Session) -> None:
    job = job_factory(db_session)
    claimed = claim_job(db_session, job.id, "w1", NOW)
    assert claimed is not None
    stale = dataclasses.replace(claimed, attempt=claimed.attempt + 1)
    assert succeed_job(db_session, stale, {"x": 1}, NOW) is False
    assert succeed_job(db_session, claimed, {"x": 1}, NOW) is True
    assert succeed_job(db_session, claimed, {"x": 2}, NOW) is False
    db_session.refresh(job)
    assert (job.state, job.result, job.finished_at) == ("succeeded", {"x": 1}, NOW)
    assert events(db_session, job)[-1] == ("running", "succeeded", 1)


def test_a_quiet_success_moves_only_a_job_whose_success_delivers_nothing(
    db_session: Session,
) -> None:
    from conveyor.webhooks import DELIVER_TYPE, create_webhook

    load_job_types(["conveyor.jobtypes.webhooks"])  # deliveries exist in this process
    tenant = tenant_factory(db_session)
    # Neither listens for successes: one is disabled, the other wants failures.
    create_webhook(
        db_session, tenant.id, "https://a.example/hook", ["job.succeeded"]
    ).enabled = False
    create_webhook(db_session, tenant.id, "https://a.example/hook", ["job.failed"])
    plain = claim_job(db_session, job_factory(db_session, tenant.id).id, "w1", NOW)
    called_back = claim_job(
        db_session,
        job_factory(db_session, tenant.id, callback_url="https://a.example/cb").id,
        "w1",
        NOW,
    )
    assert plain is not None
    assert called_back is not None
    assert (plain.success_delivers, called_back.success_delivers) == (False, True)
    stale = dataclasses.replace(plain, attempt=plain.attempt + 1)
    assert succeed_job_quietly(db_session, stale, None, NOW) is False
    # Its delivery must commit with the success: only a transaction may finish it.
    assert succeed_job_quietly(db_session, called_back, None, NOW) is False
    assert db_session.get_one(Job, called_back.id, populate_existing=True).state == "running"
    assert succeed_job_quietly(db_session, plain, {"x": 1}, NOW) is True
    job = db_session.get_one(Job, plain.id, populate_existing=True)
    assert (job.state, job.result) == ("succeeded", {"x": 1})
    assert events(db_session, job)[-1] == ("running", "succeeded", 1)

    # A webhook that starts listening after the claim stops the quiet success too.
    late = claim_job(db_session, job_factory(db_session, tenant.id).id, "w1", NOW)
    assert late is not None
    assert late.success_delivers is False
    create_webhook(db_session, tenant.id, "https://a.example/new", ["job.succeeded"])
    assert succeed_job_quietly(db_session, late, None, NOW) is False
    assert succeed_job(db_session, late, None, NOW) is True
    deliveries = db_session.scalars(select(Job.payload).where(Job.type == DELIVER_TYPE)).all()
    assert {(d["job_id"], d["url"]) for d in deliveries} == {
        (str(late.id), "https://a.example/new")
    }


def test_failure_retries_until_max_attempts_then_fails(db_session: Session) -> None:
    job = job_factory(db_session)
    job.max_attempts = 2
    db_session.flush()
    first = claim_job(db_session, job.id, "w1", NOW)
    assert first is not None
    assert fail_job(db_session, first, RuntimeError("boom"), NOW) == JobState.RETRYING
    db_session.refresh(job)
    assert job.scheduled_for is not None
    assert NOW <= job.scheduled_for <= NOW + timedelta(seconds=2)
    assert claim_job(db_session, job.id, "w1", NOW) is None  # not queued until promoted

    promoted = promote_due_jobs(db_session, NOW + timedelta(seconds=3))
    assert [j.id for j in promoted] == [job.id]
    second = claim_job(db_session, job.id, "w1", NOW)
    assert second is not None
    assert second.attempt == 2
    assert fail_job(db_session, second, RuntimeError("boom again"), NOW) == JobState.FAILED
    db_session.refresh(job)
    assert (job.state, job.error_type, job.error_message) == (
        "failed",
        "RuntimeError",
        "boom again",
    )
    assert [e[1] for e in events(db_session, job)] == [
        "queued",
        "running",
        "retrying",
        "queued",
        "running",
        "failed",
    ]


def test_non_retryable_failure_fails_at_once(db_session: Session) -> None:
    job = job_factory(db_session)
    job.max_attempts = 5
    db_session.flush()
    claimed = claim_job(db_session, job.id, "w1", NOW)
    assert claimed is not None
    assert fail_job(db_session, claimed, ValueError(""), NOW, retryable=False) == JobState.FAILED
    db_session.refresh(job)
    assert job.error_message == "ValueError"  # an empty message falls back to the type


def test_retry_delay_is_bounded_by_exponential_ceiling() -> None:
    for attempt, ceiling in [(1, 2), (2, 4), (3, 8), (20, 300)]:
        delays = [retry_delay(attempt, RetryPolicy()).total_seconds() for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jitter spreads over the range


def test_promoter_takes_back_only_unpublished_queued_jobs(db_session: Session) -> None:
    published = job_factory(db_session)
    lost = job_factory(db_session)
    mark_published(db_session, [published.id], NOW)
    db_session.execute(
        Job.__table__.update()
        .where(Job.id.in_([published.id, lost.id]))
        .values(created_at=NOW - timedelta(minutes=1))
    )
    promoted = promote_due_jobs(db_session, NOW)
    assert [j.id for j in promoted] == [lost.id]
    assert promoted[0].published_at is None  # published only after the caller's commit
    mark_published(db_session, [lost.id], NOW)
    assert promote_due_jobs(db_session, NOW) == []
    # Published long ago and still unclaimed: the reconciler checks the broker for them.
    later = NOW + timedelta(seconds=301)
    stale = stale_queued_jobs(db_session, later, older_than=300)
    assert {j.id for j in stale} == {published.id, lost.id}
    assert stale_queued_jobs(db_session, NOW, older_than=300) == []


def test_reaper_retries_or_fails_jobs_whose_heartbeat_stopped(db_session: Session) -> None:
    flaky, alive = job_factory(db_session), job_factory(db_session)
    assert flaky.max_attempts == 1
    later = NOW
    outcomes = []
    for _ in range(3):  # the job's worker dies on every attempt
        promote_due_jobs(db_session, later + timedelta(hours=1))
        later += timedelta(hours=2)
        assert claim_job(db_session, flaky.id, "w1", later) is not None
        if not outcomes:
            assert claim_job(db_session, alive.id, "w1", later) is not None
        beat_heartbeats(db_session, [alive.id], later + timedelta(seconds=100))
        reaped = dict(reap_stale_jobs(db_session, later + timedelta(seconds=121), stale_after=120))
        assert alive.id not in reaped
        outcomes.append(reaped[flaky.id])
    # Two lost workers are forgiven (an extra attempt each); the third time it fails.
    assert outcomes == [JobState.RETRYING, JobState.RETRYING, JobState.FAILED]
    db_session.refresh(flaky)
    assert (flaky.error_type, flaky.state, flaky.attempt) == ("WorkerLost", "failed", 3)
    assert "no heartbeat for 120s" in (flaky.error_message or "")
    db_session.refresh(alive)
    assert alive.state == "running"


def test_get_job_hides_other_tenants_jobs(db_session: Session) -> None:
    job = job_factory(db_session)
    other = tenant_factory(db_session, "Other")
    assert get_job(db_session, job.id, job.tenant_id).id == job.id
    with pytest.raises(NotFound):
        get_job(db_session, job.id, other.id)


def test_concurrent_claims_of_one_job_have_exactly_one_winner(
    committed: None, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        job_id = job_factory(session).id
    contenders = 16
    barrier = threading.Barrier(contenders)
    results: list[ClaimedJob | None] = []
    lock = threading.Lock()

    def contend(n: int) -> None:
        barrier.wait()
        with sessions.begin() as session:
            outcome = claim_job(session, job_id, f"w{n}", datetime.now(UTC))
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [r for r in results if r is not None]
    assert len(results) == contenders
    assert len(winners) == 1
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.attempt) == ("running", 1)
        running_events = session.scalar(
            select(func.count()).where(JobEvent.job_id == job_id, JobEvent.to_state == "running")
        )
        assert running_events == 1
