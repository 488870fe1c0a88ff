"""Transitions that race on real PostgreSQL each end in exactly one legal history.

Each race runs twice, once with either side holding its transaction open while the other
waits on the row lock, so both orders are exercised for sure; then many times with both
sides released together, in whatever order PostgreSQL takes them.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.errors import Conflict
from conveyor.ledger.reads import JobFilter
from conveyor.ledger.states import JobState, edges
from conveyor.ledger.transitions import (
    ClaimedJob,
    cancel,
    claim,
    fail,
    retry,
    retry_matching,
    succeed,
)
from conveyor.ledger.work import UnitOfWork, Work
from conveyor.models import Job, JobEvent
from conveyor.registry import load_job_types
from tests.factories import job_factory

REGISTRY = load_job_types(["conveyor.jobtypes.system"])
BY = {"user_id": None, "api_key_id": None}
# Concurrent rounds per race, with both sides released at once.
ROUNDS = 10
Step = Callable[[UnitOfWork], Any]


def now() -> datetime:
    return datetime.now(UTC)


def history(sessions: sessionmaker[Session], job_id: uuid.UUID) -> list[tuple[Any, Any]]:
    """Return a job's events, checking that they chain into one legal history."""
    with sessions() as session:
        rows = session.execute(
            select(JobEvent.from_state, JobEvent.to_state)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
        state = session.get_one(Job, job_id).state
    moves = [(source, target) for source, target in rows]
    legal = edges()
    assert all(move in legal for move in moves), moves
    assert all(prev[1] == move[0] for prev, move in itertools.pairwise(moves)), moves
    assert moves[-1][1] == state, (moves, state)
    return moves


def outcome(step: Step, work: Work) -> Any:
    """Run one side in its own unit of work; a refusal is its outcome too."""
    try:
        with work.begin() as unit:
            return step(unit)
    except Conflict as exc:
        return exc


@contextmanager
def held(work: Work, step: Step) -> Iterator[tuple[Future[Any], threading.Event]]:
    """Run `step` on a thread and hold its transaction open until the caller releases it."""
    ran, release = threading.Event(), threading.Event()

    def hold() -> Any:
        try:
            with work.begin() as unit:
                result = step(unit)
                ran.set()
                release.wait(10)
                return result
        except Conflict as exc:
            ran.set()
            return exc

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(hold)
        assert ran.wait(10)
        yield future, release
        release.set()


def race_in_order(work: Work, first: Step, second: Step, *, waits: bool = True) -> tuple[Any, Any]:
    """Let `first` move and hold its transaction open while `second` runs; return both outcomes.

    With `waits`, `second` must be waiting on the row lock until `first` commits.
    """
    with held(work, first) as (first_done, release), ThreadPoolExecutor(1) as pool:
        second_done = pool.submit(outcome, second, work)
        time.sleep(0.2)
        assert second_done.done() is not waits, "the second side waits for the row lock"
        release.set()
        return first_done.result(timeout=10), second_done.result(timeout=10)


def race_at_once(work: Work, a: Step, b: Step) -> tuple[Any, Any]:
    """Release both sides together; return their outcomes."""
    start = threading.Barrier(2)

    def go(step: Step) -> Any:
        start.wait(5)
        return outcome(step, work)

    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(go, a), pool.submit(go, b)]
        return done[0].result(timeout=10), done[1].result(timeout=10)


def queued_job(sessions: sessionmaker[Session], identity: Identity, **options: Any) -> uuid.UUID:
    with sessions.begin() as session:
        return job_factory(session, identity.tenant.id, **options).id


def running_job(sessions: sessionmaker[Session], identity: Identity, work: Work) -> ClaimedJob:
    job_id = queued_job(sessions, identity)
    with work.begin() as unit:
        claimed = claim(unit, job_id, "w0", now())
    assert claimed is not None
    return claimed


def failed_job(sessions: sessionmaker[Session], identity: Identity, work: Work) -> uuid.UUID:
    claimed = running_job(sessions, identity, work)
    with work.begin() as unit:
        assert fail(unit, claimed, RuntimeError("x"), now(), retryable=False) == JobState.FAILED
    return claimed.id


def cancelling(tenant_id: uuid.UUID, job_id: uuid.UUID) -> Step:
    return lambda unit: cancel(unit, REGISTRY, tenant_id, job_id, now(), BY)


def claiming(job_id: uuid.UUID) -> Step:
    return lambda unit: claim(unit, job_id, "w1", now())


def check_cancel_against_claim(
    sessions: sessionmaker[Session], job_id: uuid.UUID, cancelled: Any, claimed: Any
) -> None:
    moves = history(sessions, job_id)
    if claimed is None:  # the cancel came first: nothing ran
        assert cancelled[1] == "cancelled"
        assert moves == [(None, "queued"), ("queued", "cancelled")]
    else:  # the claim came first: the running job was asked to stop
        assert cancelled[1] == "cancel_requested"
        assert cancelled[0]["state"] == "running"
        assert moves == [(None, "queued"), ("queued", "running")]


@pytest.mark.usefixtures("committed")
def test_cancel_against_claim(
    sessions: sessionmaker[Session], identity: Identity, work: Work
) -> None:
    tenant = identity.tenant.id
    job_id = queued_job(sessions, identity)
    claimed, cancelled = race_in_order(work, claiming(job_id), cancelling(tenant, job_id))
    assert claimed is not None
    check_cancel_against_claim(sessions, job_id, cancelled, claimed)
    job_id = queued_job(sessions, identity)
    cancelled, claimed = race_in_order(work, cancelling(tenant, job_id), claiming(job_id))
    assert claimed is None
    check_cancel_against_claim(sessions, job_id, cancelled, claimed)
    for _ in range(ROUNDS):
        job_id = queued_job(sessions, identity)
        cancelled, claimed = race_at_once(work, cancelling(tenant, job_id), claiming(job_id))
        check_cancel_against_claim(sessions, job_id, cancelled, claimed)


def check_cancel_against_finish(
    sessions: sessionmaker[Session], job_id: uuid.UUID, cancelled: Any, finished: Any
) -> None:
    assert finished is True  # a cancel never takes a running job from its worker
    assert history(sessions, job_id)[-1] == ("running", "succeeded")
    if isinstance(cancelled, Conflict):  # the job had finished: nothing to cancel
        assert "succeeded" in cancelled.detail
    else:
        assert cancelled[1] == "cancel_requested"


@pytest.mark.usefixtures("committed")
def test_cancel_against_finish(
    sessions: sessionmaker[Session], identity: Identity, work: Work
) -> None:
    tenant = identity.tenant.id

    def finishing(job: ClaimedJob) -> Step:
        return lambda unit: succeed(unit, job, {"ok": True}, now())

    job = running_job(sessions, identity, work)
    finished, cancelled = race_in_order(work, finishing(job), cancelling(tenant, job.id))
    assert isinstance(cancelled, Conflict)
    check_cancel_against_finish(sessions, job.id, cancelled, finished)
    job = running_job(sessions, identity, work)
    cancelled, finished = race_in_order(work, cancelling(tenant, job.id), finishing(job))
    assert cancelled[1] == "cancel_requested"
    check_cancel_against_finish(sessions, job.id, cancelled, finished)
    for _ in range(ROUNDS):
        job = running_job(sessions, identity, work)
        cancelled, finished = race_at_once(work, cancelling(tenant, job.id), finishing(job))
        check_cancel_against_finish(sessions, job.id, cancelled, finished)


def check_retry_against_retry(
    sessions: sessionmaker[Session], job_id: uuid.UUID, outcomes: tuple[Any, Any]
) -> None:
    refused = [o for o in outcomes if isinstance(o, Conflict)]
    retried = [o for o in outcomes if not isinstance(o, Conflict)]
    assert (len(retried), len(refused)) == (1, 1), outcomes
    assert history(sessions, job_id)[-2:] == [("running", "failed"), ("failed", "queued")]
    with sessions() as session:
        job = session.get_one(Job, job_id)
        # One fresh budget (system.noop's one attempt), not two.
        assert (job.state, job.attempt, job.max_attempts) == ("queued", 1, 2)


@pytest.mark.usefixtures("committed")
def test_retry_against_retry(
    sessions: sessionmaker[Session], identity: Identity, work: Work
) -> None:
    tenant = identity.tenant.id

    def retrying(job_id: uuid.UUID) -> Step:
        return lambda unit: retry(unit, REGISTRY, tenant, job_id, now(), BY)

    job_id = failed_job(sessions, identity, work)
    check_retry_against_retry(
        sessions, job_id, race_in_order(work, retrying(job_id), retrying(job_id))
    )
    for _ in range(ROUNDS):
        job_id = failed_job(sessions, identity, work)
        check_retry_against_retry(
            sessions, job_id, race_at_once(work, retrying(job_id), retrying(job_id))
        )


@pytest.mark.usefixtures("committed")
def test_bulk_retry_against_claim(
    sessions: sessionmaker[Session], identity: Identity, work: Work
) -> None:
    tenant = identity.tenant.id

    def retrying_all(unit: UnitOfWork) -> list[dict[str, Any]]:
        return retry_matching(unit, REGISTRY, tenant, JobFilter(), now(), BY)

    def check(dead: uuid.UUID, queued: uuid.UUID, retried: Any, claimed: Any) -> None:
        # The bulk retry takes the failed job only; the claim of a failed job takes nothing
        # unless the retry committed first, and then it takes that attempt once.
        assert [view["id"] for view in retried] == [str(dead)]
        moves = history(sessions, dead)
        if claimed is None:
            assert moves[-1] == ("failed", "queued")
        else:
            assert moves[-2:] == [("failed", "queued"), ("queued", "running")]
            assert claimed.attempt == 2
        assert history(sessions, queued) == [(None, "queued")]

    # A stale message for the dead job arrives while the retry is uncommitted: its claim does
    # not see the retry and takes nothing (the retry's own message will run the job).
    dead, queued = failed_job(sessions, identity, work), queued_job(sessions, identity)
    retried, claimed = race_in_order(work, retrying_all, claiming(dead), waits=False)
    assert claimed is None
    check(dead, queued, retried, claimed)
    # A claim holding a queued job's lock does not hold the bulk retry up (SKIP LOCKED).
    held_queued = queued_job(sessions, identity)
    dead = failed_job(sessions, identity, work)
    claimed, retried = race_in_order(work, claiming(held_queued), retrying_all, waits=False)
    assert claimed is not None
    assert [view["id"] for view in retried] == [str(dead)]
    for _ in range(ROUNDS):
        dead, queued = failed_job(sessions, identity, work), queued_job(sessions, identity)
        retried, claimed = race_at_once(work, retrying_all, claiming(dead))
        check(dead, queued, retried, claimed)
