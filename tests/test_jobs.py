"""The lifecycle core on real PostgreSQL: submit, claim, finish, promote."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.errors import NotFound, UnknownJobType, ValidationFailed
from conveyor.ledger.dispatch import dispatch, waiting_queues
from conveyor.ledger.publishing import stamp_published
from conveyor.ledger.reads import job_row
from conveyor.ledger.states import JobState
from conveyor.ledger.transitions import ClaimedJob, claim, fail, retry_delay, succeed
from conveyor.ledger.upkeep import (
    beat_heartbeats,
    promote_due,
    reap_stale,
    stale_queued,
)
from conveyor.ledger.work import UnitOfWork, Work
from conveyor.models import Job, JobEvent
from conveyor.registry import RetryPolicy, load_job_types
from tests.factories import QUEUE, job_factory, tenant_factory

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
REGISTRY = load_job_types(["conveyor.jobtypes.system"])


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


def test_claim_takes_a_queued_job_once(db_session: Session, unit: UnitOfWork) -> None:
    job = job_factory(db_session)
    claimed = claim(unit, job.id, "w1", NOW)
    assert claimed is not None
    assert claimed.attempt == 1
    assert claim(unit, job.id, "w2", NOW) is None
    db_session.refresh(job)
    assert (job.state, job.worker, job.started_at) == ("running", "w1", NOW)


def test_succeed_is_guarded_by_state_and_claim(db_session: Session, unit: UnitOfWork) -> None:
    job = job_factory(db_session)
    claimed = claim(unit, job.id, "w1", NOW)
    assert claimed is not None
    stale = dataclasses.replace(claimed, claim_token=uuid.uuid4())
    assert succeed(unit, stale, {"x": 1}, NOW) is False
    assert succeed(unit, claimed, {"x": 1}, NOW) is True
    assert succeed(unit, claimed, {"x": 2}, NOW) is False
    db_session.refresh(job)
    assert (job.state, job.result, job.finished_at) == ("succeeded", {"x": 1}, NOW)
    assert events(db_session, job)[-1] == ("running", "succeeded", 1)


def test_a_finish_inserts_its_deliveries_in_its_own_statement(
    db_session: Session, unit: UnitOfWork
) -> None:
    from conveyor.webhooks import DELIVER_TYPE, create_webhook

    tenant = tenant_factory(db_session)
    # Neither listens for successes: one is disabled, the other wants failures.
    create_webhook(
        db_session, tenant.id, "https://a.example/off", ["job.succeeded"]
    ).enabled = False
    create_webhook(db_session, tenant.id, "https://a.example/failures", ["job.failed"])
    plain = claim(unit, job_factory(db_session, tenant.id).id, "w1", NOW)
    called_back = claim(
        unit,
        job_factory(db_session, tenant.id, callback_url="https://a.example/cb").id,
        "w1",
        NOW,
    )
    assert plain is not None
    assert called_back is not None
    # A webhook that starts listening after the claim still gets the success.
    create_webhook(db_session, tenant.id, "https://a.example/new", ["job.succeeded"])
    statements: list[str] = []
    event.listen(db_session.connection(), "before_cursor_execute", _collect(statements))
    assert succeed(unit, plain, {"x": 1}, NOW) is True
    assert succeed(unit, called_back, None, NOW) is True
    assert len(statements) == 2  # one statement each, deliveries included
    deliveries = db_session.execute(
        select(Job.payload, Job.state, Job.scheduled_for).where(Job.type == DELIVER_TYPE)
    ).all()
    assert sorted((d.payload["job_id"], d.payload["url"]) for d in deliveries) == sorted(
        [
            (str(plain.id), "https://a.example/new"),
            (str(called_back.id), "https://a.example/new"),
            (str(called_back.id), "https://a.example/cb"),
        ]
    )
    assert {(d.state, d.scheduled_for) for d in deliveries} == {(JobState.SCHEDULED, NOW)}
    assert all(d.payload["event"] == "job.succeeded" for d in deliveries)
    # Each delivery has its first event, and finishing a delivery delivers nothing.
    (delivery_id,) = db_session.scalars(
        select(Job.id).where(Job.type == DELIVER_TYPE, Job.callback_url.is_(None)).limit(1)
    ).all()
    assert events(db_session, db_session.get_one(Job, delivery_id)) == [(None, "scheduled", 0)]
    promote_due(unit, NOW)
    delivery = claim(unit, delivery_id, "w1", NOW)
    assert delivery is not None
    assert fail(unit, delivery, RuntimeError("down"), NOW, retryable=False) == JobState.FAILED
    count = db_session.scalar(select(func.count()).where(Job.type == DELIVER_TYPE))
    assert count == 3


def _collect(statements: list[str]) -> Any:
    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    return seen


def test_failure_retries_until_max_attempts_then_fails(
    db_session: Session, unit: UnitOfWork
) -> None:
    job = job_factory(db_session)
    job.max_attempts = 2
    db_session.flush()
    first = claim(unit, job.id, "w1", NOW)
    assert first is not None
    assert fail(unit, first, RuntimeError("boom"), NOW) == JobState.RETRYING
    db_session.refresh(job)
    assert job.scheduled_for is not None
    assert NOW <= job.scheduled_for <= NOW + timedelta(seconds=2)
    assert claim(unit, job.id, "w1", NOW) is None  # not queued until promoted

    assert promote_due(unit, NOW + timedelta(seconds=3)) == 1
    second = claim(unit, job.id, "w1", NOW)
    assert second is not None
    assert second.attempt == 2
    assert fail(unit, second, RuntimeError("boom again"), NOW) == JobState.FAILED
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


def test_non_retryable_failure_fails_at_once(db_session: Session, unit: UnitOfWork) -> None:
    job = job_factory(db_session)
    job.max_attempts = 5
    db_session.flush()
    claimed = claim(unit, job.id, "w1", NOW)
    assert claimed is not None
    assert fail(unit, claimed, ValueError(""), NOW, retryable=False) == JobState.FAILED
    db_session.refresh(job)
    assert job.error_message == "ValueError"  # an empty message falls back to the type


def test_retry_delay_is_bounded_by_exponential_ceiling() -> None:
    for attempt, ceiling in [(1, 2), (2, 4), (3, 8), (20, 300)]:
        delays = [retry_delay(attempt, RetryPolicy()).total_seconds() for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jitter spreads over the range


def test_the_dispatcher_publishes_queued_jobs_not_published_yet(
    db_session: Session, unit: UnitOfWork
) -> None:
    published = job_factory(db_session)
    waiting = job_factory(db_session)  # as after a failed publish, or held back at submit
    stamp_published(db_session, [published.id], NOW)
    assert waiting_queues(unit) == [QUEUE]

    def one_pass() -> int:
        passed = dispatch(unit, NOW, rooms={QUEUE: 10}, per_tenant=10, after={})
        return passed.published

    assert one_pass() == 1
    assert [m.job_id for m in unit.messages] == [waiting.id]
    assert job_row(db_session, waiting.id, waiting.tenant_id)["published_at"] == NOW
    assert one_pass() == 0
    # Published long ago and still unclaimed: the reconciler checks the broker for them.
    later = NOW + timedelta(seconds=301)
    stale = stale_queued(unit, later, older_than=300)
    assert {row["id"] for row in stale} == {published.id, waiting.id}
    assert stale_queued(unit, NOW, older_than=300) == []


def test_reaper_retries_or_fails_jobs_whose_heartbeat_stopped(
    db_session: Session, unit: UnitOfWork
) -> None:
    flaky, alive = job_factory(db_session), job_factory(db_session)
    assert flaky.max_attempts == 1
    later = NOW
    outcomes = []
    running = None
    for _ in range(3):  # the job's worker dies on every attempt
        promote_due(unit, later + timedelta(hours=1))
        later += timedelta(hours=2)
        assert claim(unit, flaky.id, "w1", later) is not None
        if not outcomes:
            running = claim(unit, alive.id, "w1", later)
        assert running is not None
        beat_heartbeats(unit, [running], later + timedelta(seconds=100))
        reaped = reap_stale(unit, REGISTRY, later + timedelta(seconds=121), stale_after=120)
        outcomes_by_id = {job_id: outcome for job_id, _, outcome in reaped}
        assert alive.id not in outcomes_by_id
        outcomes.append(outcomes_by_id[flaky.id])
    # Two lost workers are forgiven (an extra attempt each); the third time it fails.
    assert outcomes == [JobState.RETRYING, JobState.RETRYING, JobState.FAILED]
    db_session.refresh(flaky)
    assert (flaky.error_type, flaky.state, flaky.attempt) == ("WorkerLost", "failed", 3)
    assert "no heartbeat for 120s" in (flaky.error_message or "")
    db_session.refresh(alive)
    assert alive.state == "running"


def test_job_row_hides_other_tenants_jobs(db_session: Session) -> None:
    job = job_factory(db_session)
    other = tenant_factory(db_session, "Other")
    assert job_row(db_session, job.id, job.tenant_id)["id"] == job.id
    with pytest.raises(NotFound):
        job_row(db_session, job.id, other.id)


def test_concurrent_claims_of_one_job_have_exactly_one_winner(
    committed: None, sessions: sessionmaker[Session], work: Work
) -> None:
    with sessions.begin() as session:
        job_id = job_factory(session).id
    contenders = 16
    barrier = threading.Barrier(contenders)
    results: list[ClaimedJob | None] = []
    lock = threading.Lock()

    def contend(n: int) -> None:
        barrier.wait()
        with work.single_statement() as unit:
            outcome = claim(unit, job_id, f"w{n}", datetime.now(UTC))
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
