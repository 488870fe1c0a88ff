"""The job contract with a real worker on a real broker: retries, permanent failure, cancellation.

Every test runs on Redis, and on RabbitMQ too when `CONVEYOR_TEST_AMQP_URL` is set.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import wait_for
from tests.test_e2e import finished, submit
from worker.housekeeping import Housekeeper

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]


def run_until_finished(worker: Any, client: Any, auth: dict[str, str], job_id: str) -> Any:
    """Poll the job while beat's housekeeping runs, so retries get promoted."""
    housekeeper = Housekeeper.for_app(worker)

    def done() -> Any:
        housekeeper.run_once()
        return finished(client, auth, job_id)

    return wait_for(done, timeout=30, interval=0.1)


def history(client: Any, auth: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = client.get(f"/v1/jobs/{job_id}/events", headers=auth).get_json()[
        "items"
    ]
    return events


def test_retry_then_succeed(worker: Any, client: Any, auth: dict[str, str]) -> None:
    job_id = client.post(
        "/v1/jobs",
        json={"type": "system.fail", "payload": {"succeed_on_attempt": 3}, "max_attempts": 3},
        headers=auth,
    ).get_json()["id"]
    body = run_until_finished(worker, client, auth, job_id)
    assert (body["state"], body["attempts"], body["result"]) == ("succeeded", 3, {"attempt": 3})
    assert body["error"] is None
    failures = [e for e in history(client, auth, job_id) if e["to_state"] == "retrying"]
    assert len(failures) == 2
    for event in failures:
        assert event["detail"]["error_type"] == "JobFailed"
        assert event["detail"]["worker"]
        assert event["detail"]["seconds"] >= 0


def test_exhaust_then_fail(worker: Any, client: Any, auth: dict[str, str]) -> None:
    job_id = client.post(
        "/v1/jobs",
        json={"type": "system.fail", "payload": {"message": "still broken"}, "max_attempts": 2},
        headers=auth,
    ).get_json()["id"]
    body = run_until_finished(worker, client, auth, job_id)
    assert (body["state"], body["attempts"]) == ("failed", 2)
    assert body["error"] == {"type": "JobFailed", "message": "still broken"}
    states = [e["to_state"] for e in history(client, auth, job_id)]
    assert states == ["queued", "running", "retrying", "queued", "running", "failed"]


def test_a_permanent_failure_never_retries(worker: Any, client: Any, auth: dict[str, str]) -> None:
    job_id = client.post(
        "/v1/jobs",
        json={"type": "system.fail", "payload": {"permanent": True}, "max_attempts": 5},
        headers=auth,
    ).get_json()["id"]
    body = run_until_finished(worker, client, auth, job_id)
    assert (body["state"], body["attempts"]) == ("failed", 1)
    assert body["error"]["type"] == "PermanentError"


def test_manual_retry_renews_the_budget_and_keeps_history(
    worker: Any, client: Any, auth: dict[str, str]
) -> None:
    job_id = submit(client, auth, "system.fail", {"succeed_on_attempt": 2})
    assert run_until_finished(worker, client, auth, job_id)["state"] == "failed"
    bulk = client.post("/v1/jobs/retry", json={"type": "system.fail"}, headers=auth).get_json()
    assert job_id in bulk["ids"]
    body = run_until_finished(worker, client, auth, job_id)
    assert (body["state"], body["attempts"], body["max_attempts"]) == ("succeeded", 2, 2)
    states = [e["to_state"] for e in history(client, auth, job_id)]
    assert states == ["queued", "running", "failed", "queued", "running", "succeeded"]


def test_cancel_a_running_job_stops_it(worker: Any, client: Any, auth: dict[str, str]) -> None:
    job_id = submit(client, auth, "system.sleep", {"seconds": 30})
    wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["state"] == "running"
    )
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert response.status_code == 202
    assert response.get_json()["outcome"] == "cancel_requested"
    # The heartbeat (0.2 s in tests) carries the request; the next progress call stops it.
    body = wait_for(
        lambda: (
            (b := client.get(f"/v1/jobs/{job_id}", headers=auth).get_json())["state"] == "cancelled"
            and b
        ),
        timeout=10,
    )
    assert body["finished_at"] is not None
    assert body["result"] is None


def test_cancel_a_waiting_job_and_its_late_delivery_is_skipped(
    worker: Any, client: Any, auth: dict[str, str]
) -> None:
    job_id = client.post(
        "/v1/jobs", json={"type": "system.noop", "delay_seconds": 3600}, headers=auth
    ).get_json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    assert Housekeeper.for_app(worker).run_once() == (0, 0)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["attempts"] == 0
