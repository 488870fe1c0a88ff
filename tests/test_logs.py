"""Logs as data: JSON lines from the API and a real worker process, carrying the ids of the
request and job they are about, and never a payload or a key."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.settings import Settings
from conveyor.telemetry.logs import configure_logging, redact, use_json
from tests.conftest import wait_for
from tests.processes import own_queue, start_worker

MARKER = "s3cret-payload-marker"


def parse(text: str) -> list[dict[str, Any]]:
    """Parse every line; a line that is not JSON fails the test."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_api_lines_are_json_with_request_tenant_and_job(
    settings: Settings, identity: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    app = create_app(settings.model_copy(update={"log_format": "json"}))
    headers = {"Authorization": f"Bearer {identity.token}", "X-Request-ID": "req-logs-1"}
    response = app.test_client().post(
        "/v1/jobs", json={"type": "system.fail", "payload": {"message": MARKER}}, headers=headers
    )
    assert response.status_code == 202
    app.extensions["conveyor"].engine.dispose()
    text = capsys.readouterr().err
    lines = parse(text)
    submitted = [line for line in lines if line.get("event", "").startswith("job submitted")]
    assert submitted, text
    assert submitted[0]["request_id"] == "req-logs-1"
    assert submitted[0]["tenant_id"] == str(identity.tenant.id)
    assert submitted[0]["job_id"] == response.get_json()["id"]
    assert submitted[0]["job_type"] == "system.fail"
    assert {"timestamp", "level", "logger"} <= submitted[0].keys()
    assert MARKER not in text
    assert identity.token not in text


def test_sensitive_keys_are_redacted_whoever_logs_them() -> None:
    event = redact(None, "info", {"event": "x", "payload": {"card": 1}, "token": "t", "ok": 1})
    assert event == {"event": "x", "payload": "[redacted]", "token": "[redacted]", "ok": 1}


def test_development_gets_readable_text_unless_json_is_asked_for(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = settings.model_copy(update={"env": "development", "log_format": "auto"})
    assert not use_json(dev)
    assert use_json(dev.model_copy(update={"log_format": "json"}))
    assert use_json(settings)  # the test environment is not development
    try:
        configure_logging(dev)
        logging.getLogger("conveyor.test").warning("plain %s", "words", extra={"job_id": "j1"})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "plain words" in line
        assert "job_id=j1" in line
        assert not line.startswith("{")
    finally:
        configure_logging(settings)


@pytest.mark.e2e
def test_worker_lines_are_json_with_the_submitting_request_id(
    settings: Settings, identity: Identity, tmp_path: Path
) -> None:
    mine = own_queue(settings, "logs")
    worker = start_worker(mine, tmp_path)
    app = create_app(mine)
    client = app.test_client()
    try:
        headers = {"Authorization": f"Bearer {identity.token}", "X-Request-ID": "req-logs-2"}
        body = {"type": "system.sleep", "payload": {"seconds": 0.3141592}}
        job_id = client.post("/v1/jobs", json=body, headers=headers).json["id"]

        def succeeded() -> bool:
            return bool(
                client.get(f"/v1/jobs/{job_id}", headers=headers).json["state"] == "succeeded"
            )

        wait_for(succeeded)
        # Celery's own line for the finished task is written by the pool child, last.
        wait_for(
            lambda: any(line.get("logger") == "celery.app.trace" for line in worker.log_lines())
        )
    finally:
        worker.stop()
        app.extensions["conveyor"].engine.dispose()
    lines = worker.log_lines()  # every line parses as JSON
    about_job = {line["logger"]: line for line in lines if line.get("job_id") == job_id}
    assert about_job["celery.worker.strategy"]["job_type"] == "system.sleep"  # received
    finished = about_job["celery.app.trace"]  # succeeded, from inside the run
    assert finished["request_id"] == "req-logs-2"
    assert finished["tenant_id"] == str(identity.tenant.id)
    assert finished["job_type"] == "system.sleep"
    assert "3141592" not in worker.log_path.read_text()
