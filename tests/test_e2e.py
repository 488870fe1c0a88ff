"""End to end: HTTP submit, a real Celery worker on a real broker, the poll shows the outcome.

Every test runs on Redis, and on RabbitMQ too when `CONVEYOR_TEST_AMQP_URL` is set.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis import Redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.broker.config import create_celery
from conveyor.broker.internals import UNACKED_KEY
from conveyor.broker.publisher import CeleryPublisher, Message
from conveyor.models import Job, JobEvent
from conveyor.settings import Settings
from tests.conftest import wait_for, waiting
from tests.factories import job_factory
from worker.app import create_celery_app
from worker.housekeeping import Housekeeper

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]


def finished(client: Any, auth: dict[str, str], job_id: str) -> dict[str, Any] | None:
    body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    return body if body["state"] in {"succeeded", "failed"} else None


def submit(client: Any, auth: dict[str, str], type_name: str, payload: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json={"type": type_name, "payload": payload}, headers=auth)
    assert response.status_code == 202, response.get_data(as_text=True)
    job_id: str = response.get_json()["id"]
    return job_id


def test_a_job_runs_to_success_with_its_result_and_progress(
    worker: Any, client: Any, auth: dict[str, str]
) -> None:
    job_id = submit(client, auth, "system.sleep", {"seconds": 1.5})

    def progress_seen() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
        return body["progress"] if body["state"] == "running" and body["progress"] else None

    progress = wait_for(progress_seen)
    assert 0 < progress["current"] <= progress["total"]
    assert progress["message"].startswith("slept ")
    assert progress["eta_seconds"] is not None
    body = wait_for(lambda: finished(client, auth, job_id))
    assert body["state"] == "succeeded"
    assert body["result"]["slept"] >= 1.5
    assert body["attempts"] == 1
    assert body["error"] is None
    assert body["progress"] is None
    assert body["created_at"] <= body["started_at"] <= body["finished_at"]


def test_a_failing_job_ends_failed_with_its_message(
    worker: Any, client: Any, auth: dict[str, str]
) -> None:
    job_id = submit(client, auth, "system.fail", {"message": "card declined"})
    body = wait_for(lambda: finished(client, auth, job_id))
    assert body["state"] == "failed"
    assert body["error"] == {"type": "JobFailed", "message": "card declined"}
    assert "Traceback" not in str(body)


def test_the_same_message_delivered_three_times_runs_once(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    redis_client: Redis,
) -> None:
    job_id = submit(client, auth, "system.sleep", {"seconds": 0.2})
    publisher = CeleryPublisher(create_celery(settings, name="dup"))
    message = Message(uuid.UUID(job_id), "system.sleep", settings.default_queue)
    publisher.publish([message, message])
    wait_for(lambda: finished(client, auth, job_id))
    # Every delivery consumed (and on Redis, where it can be seen, acknowledged too).
    wait_for(
        lambda: (
            waiting(settings) == 0 and (settings.amqp_broker or not redis_client.hlen(UNACKED_KEY))
        )
    )
    body = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    assert (body["state"], body["attempts"]) == ("succeeded", 1)
    with sessions() as session:
        runs = session.scalar(
            select(func.count()).where(
                JobEvent.job_id == uuid.UUID(job_id), JobEvent.to_state == "running"
            )
        )
    assert runs == 1


def test_a_job_whose_publish_was_lost_is_promoted_and_runs(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    identity: Identity,
    sessions: sessionmaker[Session],
) -> None:
    # As if the broker was down at submit: committed, never published.
    with sessions.begin() as session:
        job = job_factory(session, identity.tenant.id)
        job.queue = worker.conveyor.settings.default_queue
        job.created_at = datetime.now(UTC) - timedelta(minutes=1)
    housekeeper = Housekeeper.for_app(worker)
    assert housekeeper.run_once() == (1, 0)
    body = wait_for(lambda: finished(client, auth, str(job.id)))
    assert body["state"] == "succeeded"
    assert housekeeper.run_once() == (0, 0)


def test_a_due_retry_is_promoted_and_claimed(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    identity: Identity,
    sessions: sessionmaker[Session],
) -> None:
    # Promote publishes only after its commit; published earlier, the worker's claim would
    # see the job still `retrying`, skip the message and strand the job.
    ids = []
    with sessions.begin() as session:
        for _ in range(5):
            job = job_factory(session, identity.tenant.id)
            job.queue = worker.conveyor.settings.default_queue
            job.state = "retrying"
            job.scheduled_for = datetime.now(UTC) - timedelta(seconds=1)
            ids.append(str(job.id))
    assert Housekeeper.for_app(worker).run_once() == (5, 0)
    for job_id in ids:
        assert (
            wait_for(lambda job_id=job_id: finished(client, auth, job_id))["state"] == "succeeded"
        )


def test_a_job_killed_mid_run_is_reaped_and_retried(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    identity: Identity,
    sessions: sessionmaker[Session],
) -> None:
    # As if its worker died by SIGKILL: running, claimed long ago, heartbeat silent.
    with sessions.begin() as session:
        job = job_factory(session, identity.tenant.id)
        job.queue = worker.conveyor.settings.default_queue
        job.state = "running"
        job.attempt = 1
        job.max_attempts = 2
        job.heartbeat_at = datetime.now(UTC) - timedelta(hours=1)
    assert Housekeeper.for_app(worker).run_once() == (0, 1)
    with sessions.begin() as session:  # skip the backoff
        session.get_one(Job, job.id).scheduled_for = datetime.now(UTC)
    assert Housekeeper.for_app(worker).run_once() == (1, 0)
    body = wait_for(lambda: finished(client, auth, str(job.id)))
    assert (body["state"], body["attempts"]) == ("succeeded", 2)


def test_job_types_without_a_limit_get_the_default_hard_limit(worker: Any) -> None:
    settings = worker.conveyor.settings
    assert worker.tasks["system.noop"].time_limit == settings.default_time_limit
    assert worker.tasks["system.sleep"].time_limit == 3700


def test_a_job_type_that_outruns_the_visibility_timeout_is_refused(
    base_settings: Settings,
) -> None:
    # system.sleep's hard limit is 3700 s.
    with pytest.raises(ValueError, match=r"system\.sleep may run 3700"):
        create_celery_app(base_settings.model_copy(update={"visibility_timeout": 3650}))
