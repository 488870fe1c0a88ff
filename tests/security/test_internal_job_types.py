"""Security issue #15, finding 1: `webhooks.deliver` was a public job type.

Any caller could submit a delivery naming another tenant's job (its whole view POSTed to
the caller's URL) or webhook (bodies signed with that tenant's secret). Now the type is
internal, a delivery stays inside its tenant and sends only to its webhook's or job's URL,
`/v1/queues` hands out no other tenant's job ids, and delivery payloads and URLs are for
operators.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.errors import ValidationFailed
from conveyor.ledger.requests import JobRequest
from conveyor.ledger.submit import submit_jobs
from conveyor.ledger.work import UnitOfWork
from conveyor.models import Job, Schedule
from conveyor.settings import Settings
from conveyor.webhooks import DELIVER_TYPE, SIGNATURE_HEADER, create_webhook, verify
from tests.conftest import Receiver, bearer, row_counts, wait_for
from tests.factories import job_factory, other_tenant
from tests.test_api import assert_problem
from tests.test_e2e import finished
from tests.test_webhooks import drive
from worker.housekeeping import Housekeeper
from worker.runner import run_job

LEDGER = ("jobs", "job_events", "schedules", "audit_log")
ELSEWHERE = "http://127.0.0.1:9/elsewhere"


def delivery(job_id: object, url: str, **more: Any) -> dict[str, Any]:
    """Return a delivery payload: which job's event goes to which URL."""
    return {"job_id": str(job_id), "event": "job.succeeded", "url": url, **more}


# --- Clients cannot submit it, list it or schedule it --------------------------------------


def _submit(client: Any, auth: dict[str, str], job_type: str, payload: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json={"type": job_type, "payload": payload}, headers=auth)


def _batch(client: Any, auth: dict[str, str], job_type: str, payload: dict[str, Any]) -> Any:
    jobs = [{"type": "system.noop"}, {"type": job_type, "payload": payload}]
    return client.post("/v1/jobs/batch", json={"jobs": jobs}, headers=auth)


def _schedule(client: Any, auth: dict[str, str], job_type: str, payload: dict[str, Any]) -> Any:
    body = {"name": uuid.uuid4().hex, "job_type": job_type, "payload": payload}
    return client.post("/v1/schedules", json={**body, "interval_seconds": 60}, headers=auth)


def _reschedule(client: Any, auth: dict[str, str], job_type: str, payload: dict[str, Any]) -> Any:
    (schedule,) = client.get("/v1/schedules", headers=auth).get_json()["items"]
    body = {"job_type": job_type, "payload": payload}
    return client.patch(f"/v1/schedules/{schedule['id']}", json=body, headers=auth)


Submit = Callable[[Any, dict[str, str], str, dict[str, Any]], Any]
SUBMITS: dict[str, tuple[Submit, str]] = {
    "POST /v1/jobs": (_submit, "type"),
    "POST /v1/jobs/batch": (_batch, "jobs[1].type"),
    "POST /v1/schedules": (_schedule, "job_type"),
    "PATCH /v1/schedules/{id}": (_reschedule, "job_type"),
}


@pytest.mark.parametrize("route", SUBMITS)
def test_an_internal_type_is_422_like_a_missing_one_and_writes_nothing(
    route: str,
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    submit, field = SUBMITS[route]
    victim = other_tenant(sessions, settings)
    with sessions.begin() as session:
        victims_job = job_factory(session, victim.tenant.id).id
    payload = delivery(victims_job, "https://attacker.example/x")
    existing = _schedule(client, auth, "system.noop", {})
    assert existing.status_code == 201
    before = row_counts(sessions, *LEDGER)
    schedules_before = client.get("/v1/schedules", headers=auth).get_json()

    problem = assert_problem(submit(client, auth, DELIVER_TYPE, payload), 422)
    missing = assert_problem(submit(client, auth, "no.such.type", payload), 422)

    assert problem["errors"] == [{"field": field, "message": f"unknown job type {DELIVER_TYPE!r}"}]
    # Word for word a type that does not exist: nothing says the internal one does.
    assert json.dumps(problem).replace(DELIVER_TYPE, "T").replace(problem["request_id"], "") == (
        json.dumps(missing).replace("no.such.type", "T").replace(missing["request_id"], "")
    )
    assert row_counts(sessions, *LEDGER) == before
    assert client.get("/v1/schedules", headers=auth).get_json() == schedules_before


def test_internal_types_are_not_listed(client: Any, auth: dict[str, str]) -> None:
    names = {t["name"] for t in client.get("/v1/job-types", headers=auth).get_json()["items"]}
    assert "system.noop" in names
    assert DELIVER_TYPE not in names


@pytest.mark.e2e
def test_a_stored_schedule_of_an_internal_type_never_fires(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    identity: Identity,
    sessions: sessionmaker[Session],
) -> None:
    # As a schedule written before the type became internal would be.
    with sessions.begin() as session:
        schedule = Schedule(
            tenant_id=identity.tenant.id,
            name="old",
            job_type=DELIVER_TYPE,
            payload=delivery(uuid.uuid4(), "https://attacker.example/x"),
            interval_seconds=60,
            next_run_at=datetime.now(UTC) - timedelta(seconds=1),
        )
        session.add(schedule)
    assert_problem(client.post(f"/v1/schedules/{schedule.id}/trigger", headers=auth), 422)
    assert Housekeeper.for_app(worker).fire_schedules() == 0
    assert row_counts(sessions, "jobs") == {"jobs": 0}


# --- A delivery stays in its tenant and sends only to its own URL ---------------------------


@dataclass(frozen=True)
class Tenants:
    """Tenant A (the deliveries' own) and tenant B, each with a job and a webhook."""

    a: Identity
    b: Identity
    a_job: uuid.UUID  # its callback_url is the receiver
    a_plain_job: uuid.UUID  # no callback_url
    a_hook: uuid.UUID  # to the receiver
    a_hook_secret: str
    a_other_hook: uuid.UUID  # to ELSEWHERE
    b_job: uuid.UUID  # its callback_url is the receiver too
    b_hook: uuid.UUID  # to the receiver too


@pytest.fixture
def tenants(
    identity: Identity, sessions: sessionmaker[Session], settings: Settings, receiver: str
) -> Tenants:
    b = other_tenant(sessions, settings)
    a_id, b_id = identity.tenant.id, b.tenant.id
    with sessions.begin() as session:
        a_hook = create_webhook(session, a_id, receiver, ["job.succeeded"])
        return Tenants(
            a=identity,
            b=b,
            a_job=job_factory(session, a_id, callback_url=receiver).id,
            a_plain_job=job_factory(session, a_id).id,
            a_hook=a_hook.id,
            a_hook_secret=a_hook.secret,
            a_other_hook=create_webhook(session, a_id, ELSEWHERE, ["job.succeeded"]).id,
            b_job=job_factory(session, b_id, callback_url=receiver).id,
            b_hook=create_webhook(session, b_id, receiver, ["job.succeeded"]).id,
        )


def enqueue_delivery(worker: Any, tenant_id: uuid.UUID, payload: dict[str, Any]) -> uuid.UUID:
    """Insert a delivery job through the submit path with the platform's internal flag.

    Unpublished: the test runs it itself, not the worker listening on the queue.
    """
    services = worker.conveyor
    with Session(services.engine) as session, session.begin():
        (job,) = submit_jobs(
            UnitOfWork.around(session),
            services.registry,
            [JobRequest(type=DELIVER_TYPE, payload=payload)],
            tenant_id=tenant_id,
            default_queue=services.settings.default_queue,
            now=datetime.now(UTC),
            allow_internal=True,
        )
    job_id: uuid.UUID = job.id
    return job_id


def run_delivery(worker: Any, job_id: uuid.UUID) -> Job:
    """Claim, run and finish the delivery as the worker does; return its row."""
    run_job(worker.conveyor, str(job_id))
    with worker.conveyor.work.reading() as session:
        return session.get_one(Job, job_id)


Scenario = Callable[[Tenants, str], dict[str, Any]]
SCENARIOS: dict[str, tuple[Scenario, str]] = {
    # Controls: the harness does send when it should.
    "own job to its callback URL": (lambda t, url: delivery(t.a_job, url), "sent"),
    "own job to its webhook": (
        lambda t, url: delivery(t.a_job, url, webhook_id=str(t.a_hook)),
        "signed",
    ),
    "another tenant's job": (lambda t, url: delivery(t.b_job, url), "skipped"),
    "another tenant's webhook (its secret)": (
        lambda t, url: delivery(t.a_job, url, webhook_id=str(t.b_hook)),
        "skipped",
    ),
    "a URL that is not the webhook's": (
        lambda t, url: delivery(t.a_job, url, webhook_id=str(t.a_other_hook)),
        "refused",
    ),
    "a URL that is not the job's callback URL": (
        lambda t, url: delivery(t.a_plain_job, url),
        "refused",
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_delivery_sends_only_its_own_tenants_job_to_its_own_url(
    scenario: str, worker: Any, tenants: Tenants, receiver: str
) -> None:
    make, expected = SCENARIOS[scenario]
    job = run_delivery(
        worker, enqueue_delivery(worker, tenants.a.tenant.id, make(tenants, receiver))
    )
    if expected in {"sent", "signed"}:
        assert job.state == "succeeded", (job.error_type, job.error_message)
        ((headers, body),) = Receiver.received
        assert json.loads(body)["job"]["id"] == str(tenants.a_job)
        signature = headers.get(SIGNATURE_HEADER)
        if expected == "signed":
            assert signature is not None
            assert verify(tenants.a_hook_secret, signature, body, int(time.time()))
        else:
            assert signature is None
        return
    assert Receiver.received == []
    if expected == "skipped":  # another tenant's row is as absent as a deleted one
        assert job.state == "succeeded"
        assert job.result is not None
        assert "skipped" in job.result
    else:  # refused for good, never retried
        assert (job.state, job.error_type, job.attempt) == ("failed", "PermanentError", 1)


@pytest.mark.e2e
def test_an_unknown_event_is_refused(
    worker: Any, tenants: Tenants, receiver: str, sessions: sessionmaker[Session]
) -> None:
    bad = {**delivery(tenants.a_job, receiver), "event": "job.exploded"}
    with pytest.raises(ValidationFailed) as refused:
        enqueue_delivery(worker, tenants.a.tenant.id, bad)
    assert refused.value.errors[0]["field"] == "payload.event"
    # A row stored before the check (by an older version) fails at run time, sending nothing.
    job_id = enqueue_delivery(worker, tenants.a.tenant.id, delivery(tenants.a_job, receiver))
    with sessions.begin() as session:
        session.execute(
            text(
                'UPDATE jobs SET payload = payload || \'{"event": "job.exploded"}\' WHERE id = :id'
            ),
            {"id": job_id},
        )
    job = run_delivery(worker, job_id)
    assert (job.state, job.error_type, job.attempt) == ("failed", "ValidationFailed", 1)
    assert Receiver.received == []


# --- Who sees what: /v1/queues, delivery payloads and URLs ---------------------------------


@pytest.mark.e2e
def test_queues_show_no_other_tenants_running_job(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    other = bearer(other_tenant(sessions, settings).token)
    sleep = {"type": "system.sleep", "payload": {"seconds": 30}}
    running_id = client.post("/v1/jobs", json=sleep, headers=other).get_json()["id"]
    try:
        wait_for(
            lambda: (
                client.get(f"/v1/jobs/{running_id}", headers=other).get_json()["state"] == "running"
            )
        )
        mine = client.get("/v1/queues", headers=auth).get_json()
        theirs = client.get("/v1/queues", headers=other).get_json()
    finally:
        client.post(f"/v1/jobs/{running_id}/cancel", headers=other)
        wait_for(
            lambda: (
                client.get(f"/v1/jobs/{running_id}", headers=other).get_json()["state"]
                == "cancelled"
            )
        )

    def running(body: dict[str, Any]) -> tuple[list[str], int]:
        ids = [job_id for w in body["workers"] for job_id in w["active_job_ids"]]
        (queue,) = [q for q in body["queues"] if q["name"] == settings.default_queue]
        return ids, queue["running"]

    assert running(theirs) == ([running_id], 1)  # the worker answered, and with this job
    assert running(mine) == ([], 0)


@pytest.mark.e2e
def test_delivery_payloads_and_urls_are_for_operators_only(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    role_tokens: dict[str, str],
    receiver: str,
) -> None:
    Receiver.failures = 1  # a failed attempt too: its error must not quote the URL either
    body = {"type": "system.noop", "callback_url": receiver}
    job_id = client.post("/v1/jobs", json=body, headers=auth).get_json()["id"]
    wait_for(lambda: finished(client, auth, job_id))

    def delivered() -> list[dict[str, Any]] | None:
        log: list[dict[str, Any]] = client.get(
            f"/v1/jobs/{job_id}/deliveries", headers=auth
        ).get_json()["items"]
        return log if log and log[-1]["outcome"] == "succeeded" else None

    delivery_id = drive(worker, delivered)[0]["delivery_id"]
    # Operators first and last: hiding a payload from the others must not change the
    # snapshot every role's poll shares.
    for role in ["admin", "viewer", "member", "operator", "admin"]:
        headers = bearer(role_tokens[role])
        view = client.get(f"/v1/jobs/{delivery_id}", headers=headers)
        listed = client.get(f"/v1/jobs?type={DELIVER_TYPE}", headers=headers)
        log = client.get(f"/v1/jobs/{job_id}/deliveries", headers=headers)
        events = client.get(f"/v1/jobs/{delivery_id}/events", headers=headers)
        (item,) = listed.get_json()["items"]
        urls = {entry["url"] for entry in log.get_json()["items"]}
        if role in {"admin", "operator"}:
            assert view.get_json()["payload"]["url"] == receiver
            assert item["payload"]["url"] == receiver
            assert urls == {receiver}
        else:
            assert view.get_json()["payload"] == {}
            assert item["payload"] == {}
            assert urls == {None}
            for answer in (view, listed, log, events):
                assert receiver not in answer.get_data(as_text=True), role
