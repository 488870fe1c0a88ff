"""A claim commits without its WAL flush: its token guards every finish, its views wait."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.ledger.transitions import claim, fail, stop, succeed
from conveyor.ledger.upkeep import beat_heartbeats
from conveyor.ledger.work import UnitOfWork, Work
from conveyor.models import Job, JobEvent, QueuePause
from tests.factories import job_factory

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class Lost(Exception):
    """PostgreSQL forgot the claim: its transaction never happened."""


def shown(unit: UnitOfWork) -> list[tuple[uuid.UUID, int, str]]:
    return [(v.job_id, v.version, json.loads(v.doc or "{}")["state"]) for v in unit.views]


def test_the_run_of_a_lost_claim_finishes_nothing_and_the_next_claim_runs_once(
    db_session: Session, unit: UnitOfWork
) -> None:
    job = job_factory(db_session)
    taken = []

    def claim_then_lose() -> None:
        with unit.savepoint():
            taken.append(claim(unit, job.id, "w1", NOW))
            raise Lost

    with pytest.raises(Lost):
        claim_then_lose()
    [lost] = taken
    assert lost is not None
    db_session.refresh(job)
    assert (job.state, job.attempt) == ("queued", 0)
    # The job's message (or the reconciler) runs it again: the same attempt number.
    again = claim(unit, job.id, "w2", NOW)
    assert again is not None
    assert again.attempt == lost.attempt == 1
    assert again.claim_token != lost.claim_token
    # The first run, still going, finishes nothing and keeps nothing alive.
    later = NOW + timedelta(seconds=30)
    assert succeed(unit, lost, {"run": "lost"}, later) is False
    assert fail(unit, lost, RuntimeError("x"), later) is None
    assert stop(unit, lost, later) is False
    assert beat_heartbeats(unit, [lost], later) == set()
    db_session.refresh(job)
    assert (job.state, job.heartbeat_at, job.worker) == ("running", NOW, "w2")
    assert shown(unit) == []  # no view of the lost claim, nor of its run
    assert succeed(unit, again, {"run": "again"}, later) is True
    db_session.refresh(job)
    assert (job.state, job.result, job.attempt) == ("succeeded", {"run": "again"}, 1)
    moves = db_session.execute(
        select(JobEvent.from_state, JobEvent.to_state)
        .where(JobEvent.job_id == job.id)
        .order_by(JobEvent.id)
    ).all()
    assert [tuple(m) for m in moves] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]


def test_a_claims_view_waits_for_a_durable_write_that_names_it(
    db_session: Session, unit: UnitOfWork
) -> None:
    quick, slow = job_factory(db_session), job_factory(db_session)
    quick_claim = claim(unit, quick.id, "w1", NOW)
    slow_claim = claim(unit, slow.id, "w1", NOW)
    assert quick_claim is not None
    assert slow_claim is not None
    assert shown(unit) == []
    # A quick job: its finish shows the running view, then the finished one.
    assert succeed(unit, quick_claim, None, NOW)
    assert shown(unit) == [(quick.id, 2, "running"), (quick.id, 3, "succeeded")]
    unit.views.clear()
    # A slow one: its first heartbeat shows it running, once.
    beat_heartbeats(unit, [slow_claim], NOW)
    beat_heartbeats(unit, [slow_claim], NOW)
    assert succeed(unit, slow_claim, None, NOW)
    assert shown(unit) == [(slow.id, 2, "running"), (slow.id, 3, "succeeded")]


def test_a_claim_sent_back_to_wait_is_shown_at_once(db_session: Session, unit: UnitOfWork) -> None:
    job = job_factory(db_session)
    db_session.add(QueuePause(queue=job.queue, tenant_id=None))
    db_session.flush()
    assert claim(unit, job.id, "w1", NOW) is None
    [(job_id, _, state)] = shown(unit)
    assert (job_id, state) == (job.id, "queued")
    assert json.loads(unit.views[0].doc or "{}")["waiting_for"] == "pause"


def test_only_the_claims_transaction_skips_its_wal_flush(
    identity: Identity, sessions: sessionmaker[Session], work: Work
) -> None:
    with sessions.begin() as session:
        job_id = job_factory(session, identity.tenant.id).id
    with work.single_statement() as unit:
        setting = text("SHOW synchronous_commit")
        assert unit.session.execute(setting).scalar() == "on"
        assert claim(unit, job_id, "w1", datetime.now(UTC)) is not None
        # The claim's own transaction ended with the statement; the next one flushes again.
        assert unit.session.execute(setting).scalar() == "on"
    with sessions.begin() as session:
        assert session.get_one(Job, job_id).claim_token is not None


def test_a_claim_sets_its_transaction_not_to_wait_for_the_wal_flush(
    db_session: Session, unit: UnitOfWork
) -> None:
    setting = text("SHOW synchronous_commit")
    assert db_session.execute(setting).scalar() == "on"
    assert claim(unit, job_factory(db_session).id, "w1", NOW) is not None
    assert db_session.execute(setting).scalar() == "off"


def test_a_finish_alone_leaves_a_job_with_dependents_to_a_transaction(
    db_session: Session, unit: UnitOfWork
) -> None:
    parent = job_factory(db_session)
    child = job_factory(db_session, parent.tenant_id, depends_on=[parent.id])
    claimed = claim(unit, parent.id, "w1", NOW)
    assert claimed is not None
    # Settling the dependent takes statements that must share the finish's transaction.
    assert succeed(unit, claimed, None, NOW, alone=True) is False
    db_session.refresh(parent)
    assert parent.state == "running"
    assert succeed(unit, claimed, None, NOW) is True
    db_session.refresh(child)
    assert (child.state, child.dependencies_left) == ("queued", 0)
