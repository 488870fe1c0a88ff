"""Submit's outbox: `published_at` written with the job, undone by a failed publish.

A submit is BEGIN, one statement, COMMIT, and the publish: no `UPDATE` follows a publish
that succeeds. A failed publish clears `published_at` for the promoter; a job stamped but
never published (the API died after its commit, or the clearing failed too) is re-driven
by the reconciler.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, event, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.broker.inspect import broker_task_ids, queue_lists
from conveyor.models import Job
from conveyor.settings import Settings
from worker.app import create_celery_app
from worker.housekeeping import Housekeeper

DEAD_REDIS = SecretStr("redis://127.0.0.1:1/0")
NOOP = {"type": "system.noop"}


@pytest.fixture
def sent(app: Any) -> Iterator[Counter[str]]:
    """Count what the API sends to PostgreSQL: BEGINs, COMMITs and statements by verb."""
    counts: Counter[str] = Counter()
    engine: Engine = app.extensions["conveyor"].engine

    def statement(_conn: Any, _cursor: Any, text: str, *_: Any) -> None:
        if "FROM queue_pauses" in text:
            return  # the submit gate's refresh: once per process every 0.5 s, not per request
        counts.update([text.split(None, 1)[0].upper()])

    def sent_by_driver(conn: Any) -> bool:
        # On an autocommit connection SQLAlchemy still fires begin and commit, but the
        # driver sends neither.
        return bool(conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT")

    def begin(conn: Any) -> None:
        if sent_by_driver(conn):
            counts.update(["BEGIN"])

    def commit(conn: Any) -> None:
        if sent_by_driver(conn):
            counts.update(["COMMIT"])

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "begin", begin)
    event.listen(engine, "commit", commit)
    yield counts
    event.remove(engine, "before_cursor_execute", statement)
    event.remove(engine, "begin", begin)
    event.remove(engine, "commit", commit)


def ledger(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        return session.get_one(Job, uuid.UUID(job_id))


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/batch"])
def test_a_submit_is_one_round_trip_and_stamps_published_at_with_the_row(
    client: Any,
    auth: dict[str, str],
    sent: Counter[str],
    sessions: sessionmaker[Session],
    path: str,
) -> None:
    body: dict[str, Any] = NOOP if path == "/v1/jobs" else {"jobs": [NOOP] * 50}
    assert client.post(path, json=body, headers=auth).status_code == 202  # warms the key cache
    sent.clear()
    response = client.post(path, json=body, headers=auth)
    assert response.status_code == 202
    # The jobs and their first events in one statement (a WITH ... INSERT), in autocommit
    # (no BEGIN, no COMMIT: `one_statement`); no UPDATE.
    assert sent == {"WITH": 1}, sent
    answer = response.get_json()
    for item in answer.get("items", [answer]):
        job = ledger(sessions, item["id"])
        assert job.published_at == job.created_at


def test_a_delayed_job_is_not_stamped(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    response = client.post("/v1/jobs", json={**NOOP, "delay_seconds": 60}, headers=auth)
    assert response.status_code == 202
    assert ledger(sessions, response.get_json()["id"]).published_at is None


@pytest.fixture
def queue(settings: Settings, redis_client: Any) -> Iterator[str]:
    """Return a Redis-broker queue of this test's own, emptied afterwards."""
    name = f"outbox-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(*queue_lists(name))


@pytest.fixture
def housekeeper(settings: Settings, queue: str) -> Iterator[Housekeeper]:
    """Yield a housekeeper publishing to the test Redis."""
    app = create_celery_app(settings.model_copy(update={"default_queue": queue}))
    yield Housekeeper.for_app(app)
    app.conveyor.engine.dispose()


@pytest.fixture
def dead_broker_client(settings: Settings, queue: str) -> Iterator[Any]:
    """Yield a test client of an API whose broker is down."""
    app = create_app(settings.model_copy(update={"broker_url": DEAD_REDIS, "default_queue": queue}))
    yield app.test_client()
    app.extensions["conveyor"].engine.dispose()


def age(sessions: sessionmaker[Session], ids: list[str], **columns: Any) -> None:
    """Move some timestamps of jobs back an hour: the wait the promoter or reconciler needs."""
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_([uuid.UUID(i) for i in ids]))
            .values({name: datetime.now(UTC) - timedelta(hours=1) for name in columns})
        )


def test_a_failed_publish_clears_published_at_and_the_promoter_publishes_the_jobs(
    dead_broker_client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    housekeeper: Housekeeper,
    redis_client: Any,
    queue: str,
) -> None:
    single = dead_broker_client.post("/v1/jobs", json=NOOP, headers=auth)
    batch = dead_broker_client.post("/v1/jobs/batch", json={"jobs": [NOOP] * 3}, headers=auth)
    assert (single.status_code, batch.status_code) == (202, 202)
    ids = [single.get_json()["id"], *(item["id"] for item in batch.get_json()["items"])]
    assert [ledger(sessions, i).published_at for i in ids] == [None] * 4
    age(sessions, ids, created_at=True)
    assert housekeeper.dispatch() == 4
    assert broker_task_ids(redis_client, [queue], limit=100) == set(ids)
    assert all(ledger(sessions, i).published_at is not None for i in ids)


def test_a_job_stamped_but_never_published_is_redriven_by_the_reconciler(
    dead_broker_client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    housekeeper: Housekeeper,
    redis_client: Any,
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The publish fails and so does clearing the stamp (the database went too): the ledger
    # says published, the broker has nothing, as when the API dies between commit and publish.
    def database_gone(*_: Any) -> None:
        raise OperationalError("UPDATE jobs", {}, Exception("connection lost"))

    monkeypatch.setattr("conveyor.ledger.work.unmark_published", database_gone)
    response = dead_broker_client.post("/v1/jobs", json=NOOP, headers=auth)
    assert response.status_code == 202
    job_id = response.get_json()["id"]
    assert ledger(sessions, job_id).published_at is not None
    assert housekeeper.dispatch() == 0  # stamped: not the dispatcher's
    assert housekeeper.reconcile() == 0  # not stale yet: its message may still be on its way
    age(sessions, [job_id], created_at=True, published_at=True)  # reconcile_after passed
    assert housekeeper.reconcile() == 1
    assert broker_task_ids(redis_client, [queue], limit=100) == {job_id}
