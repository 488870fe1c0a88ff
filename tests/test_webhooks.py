"""Webhooks end to end: a real local receiver, signatures it can verify, retries, SSRF."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from conveyor.webhooks import SIGNATURE_HEADER, sign, verify
from tests.conftest import Receiver, wait_for
from tests.test_api import assert_problem
from tests.test_e2e import finished
from worker.housekeeping import Housekeeper

pytestmark = pytest.mark.e2e


def drive(worker: Any, condition: Any, timeout: float = 30) -> Any:
    """Run beat's promotion and dispatch while waiting, so deliveries and retries go out."""
    housekeeper = Housekeeper.for_app(worker)

    def check() -> Any:
        housekeeper.promote()
        housekeeper.dispatch()
        return condition()

    return wait_for(check, timeout=timeout, interval=0.2)


def test_a_signed_delivery_reaches_a_real_receiver(
    worker: Any, client: Any, auth: dict[str, str], receiver: str
) -> None:
    created = client.post(
        "/v1/webhooks", json={"url": receiver, "events": ["job.succeeded"]}, headers=auth
    )
    assert created.status_code == 201
    secret = created.get_json()["secret"]
    assert "secret" not in client.get("/v1/webhooks", headers=auth).get_json()["items"][0]
    job = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).get_json()
    wait_for(lambda: finished(client, auth, job["id"]))
    drive(worker, lambda: Receiver.received)
    headers, body = Receiver.received[0]
    assert verify(secret, headers[SIGNATURE_HEADER], body, int(time.time()))
    assert not verify("whsec_wrong", headers[SIGNATURE_HEADER], body, int(time.time()))
    assert not verify(secret, headers[SIGNATURE_HEADER], body + b" ", int(time.time()))
    sent = json.loads(body)
    assert (sent["event"], sent["job"]["id"], sent["job"]["state"]) == (
        "job.succeeded",
        job["id"],
        "succeeded",
    )
    log = drive(
        worker,
        lambda: client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth).get_json()["items"],
    )
    assert (log[0]["outcome"], log[0]["status_code"], log[0]["attempt"]) == ("succeeded", 204, 1)


def test_a_failing_receiver_gets_three_attempts(
    worker: Any, client: Any, auth: dict[str, str], receiver: str
) -> None:
    Receiver.failures = 2
    job = client.post(
        "/v1/jobs", json={"type": "system.noop", "callback_url": receiver}, headers=auth
    ).get_json()
    wait_for(lambda: finished(client, auth, job["id"]))

    def delivered() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = client.get(
            f"/v1/jobs/{job['id']}/deliveries", headers=auth
        ).get_json()["items"]
        return items if items and items[-1]["outcome"] == "succeeded" else None

    log = drive(worker, delivered, timeout=60)
    assert [(e["attempt"], e["outcome"], e["status_code"]) for e in log] == [
        (1, "retrying", 500),
        (2, "retrying", 500),
        (3, "succeeded", 204),
    ]
    assert len(Receiver.received) == 3
    assert SIGNATURE_HEADER not in Receiver.received[0][0]  # callback URLs are unsigned


def test_deliveries_to_private_addresses_are_refused(
    worker: Any, client: Any, auth: dict[str, str]
) -> None:
    job = client.post(
        "/v1/jobs",
        json={"type": "system.noop", "callback_url": "http://169.254.169.254/latest/"},
        headers=auth,
    ).get_json()
    wait_for(lambda: finished(client, auth, job["id"]))

    def refused() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = client.get(
            f"/v1/jobs/{job['id']}/deliveries", headers=auth
        ).get_json()["items"]
        return items

    log = drive(worker, refused)
    assert (log[0]["outcome"], log[0]["attempt"]) == ("failed", 1)
    assert "non-public address" in log[0]["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"url": "ftp://example.com/", "events": ["job.failed"]},
        {"url": "https://example.com/", "events": ["job.exploded"]},
        {"url": "https://example.com/", "events": []},
    ],
)
def test_bad_webhooks_are_422(client: Any, auth: dict[str, str], body: dict[str, Any]) -> None:
    assert_problem(client.post("/v1/webhooks", json=body, headers=auth), 422)


def test_a_non_http_callback_url_is_422(client: Any, auth: dict[str, str]) -> None:
    body = {"type": "system.noop", "callback_url": "javascript:alert(1)"}
    problem = assert_problem(client.post("/v1/jobs", json=body, headers=auth), 422)
    assert problem["errors"][0]["field"] == "callback_url"


def test_signatures_expire() -> None:
    body = b"{}"
    header = sign("s", 1_000, body)
    assert verify("s", header, body, now=1_100)
    assert not verify("s", header, body, now=2_000)
    assert not verify("s", "garbage", body, now=1_000)
