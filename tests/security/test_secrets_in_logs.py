"""Issue #15, finding 4: no secret reaches a log line, even when a job or a request fails.

Before, the console format printed tracebacks with each frame's local variables, so the
settings (secret key, Flower password, database URL) and a webhook's signature header
landed in the worker's log whenever a job failed, which any member can cause.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Iterator
from http.server import HTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import make_url

from api import create_app
from api.services import services
from conveyor.auth.bootstrap import Identity
from conveyor.settings import Settings
from conveyor.telemetry.logs import configure_logging
from conveyor.webhooks import SIGNATURE_HEADER
from tests.conftest import bearer, wait_for
from tests.processes import own_queue, process_env, start_worker
from tests.security.conftest import SettingsFromEnv
from tests.test_webhooks import Receiver
from worker.app import create_celery_app
from worker.housekeeping import Housekeeper

FLOWER_PASSWORD = "flower-" + secrets.token_urlsafe(18)
METRICS_TOKEN = "metrics-" + secrets.token_urlsafe(18)
DATABASE_PASSWORD = "dbpass-" + secrets.token_urlsafe(18)


def secret_env(settings: Settings) -> dict[str, str]:
    """Return the environment changes that give a process distinctive secret values."""
    plain_url = process_env(settings)["CONVEYOR_DATABASE_URL"]
    # The test server trusts local connections: a password in the URL is sent and ignored.
    with_password = make_url(plain_url).set(password=DATABASE_PASSWORD)
    return {
        "CONVEYOR_FLOWER_PASSWORD": FLOWER_PASSWORD,
        "CONVEYOR_METRICS_TOKEN": METRICS_TOKEN,
        "CONVEYOR_DATABASE_URL": with_password.render_as_string(hide_password=False),
        "CONVEYOR_OUTBOUND_ALLOW_HOSTS": '["127.0.0.1"]',
    }


def assert_no_secret(text: str, values: dict[str, str]) -> None:
    """Fail, naming the secret and the line, if any line of `text` holds any of `values`."""
    for line in text.splitlines():
        for name, value in values.items():
            assert value not in line, f"{name} leaked: {line[:300]}"


@pytest.fixture
def receiver() -> Iterator[str]:
    """Yield the URL of a local webhook receiver that answers every delivery with a 500."""
    Receiver.received, Receiver.failures = [], 1_000_000
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    server.server_close()


def test_settings_never_show_their_secrets(
    settings: Settings, settings_from_env: SettingsFromEnv
) -> None:
    mine = settings_from_env(settings, **secret_env(settings))
    env = process_env(mine)
    values = {
        "secret key": env["CONVEYOR_SECRET_KEY"],
        "database password": DATABASE_PASSWORD,
        "flower password": FLOWER_PASSWORD,
        "metrics token": METRICS_TOKEN,
    }
    for shown in (repr(mine), str(mine), str(mine.model_dump()), mine.model_dump_json()):
        assert_no_secret(shown, values)


def test_a_refused_secret_is_not_echoed_in_the_error_that_stops_the_process(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("CONVEYOR_")]:
        monkeypatch.delenv(name)
    refused_password = "Zq81-" + secrets.token_hex(3)  # too short for production
    # Pydantic's error shows the start and the end of the inputs: the password comes last.
    with pytest.raises(ValidationError, match="CONVEYOR_FLOWER_PASSWORD") as refused:
        Settings(
            _env_file=None,
            env="production",
            secret_key=process_env(settings)["CONVEYOR_SECRET_KEY"],
            flower_password=refused_password,
        )
    assert refused_password not in str(refused.value)


def test_a_secret_setting_passed_as_a_log_field_is_redacted(
    settings: Settings,
    settings_from_env: SettingsFromEnv,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mine = settings_from_env(settings, **secret_env(settings), CONVEYOR_LOG_FORMAT="json")
    try:
        configure_logging(mine)
        logging.getLogger("conveyor.test").warning(
            "connecting", extra={"dsn": mine.database_url, "flower": mine.flower_password}
        )
        text = capsys.readouterr().err
    finally:
        configure_logging(settings)
    assert "connecting" in text
    assert_no_secret(text, {"database password": DATABASE_PASSWORD, "flower": FLOWER_PASSWORD})


@pytest.mark.e2e
@pytest.mark.parametrize("log_format", ["console", "json"])
def test_failing_jobs_deliveries_and_requests_log_no_secret(
    settings: Settings,
    settings_from_env: SettingsFromEnv,
    identity: Identity,
    receiver: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    log_format: str,
) -> None:
    mine = own_queue(settings, "secrets")
    changes = {**secret_env(mine), "CONVEYOR_LOG_FORMAT": log_format}
    worker = start_worker(mine, tmp_path, **changes)
    api_settings = settings_from_env(mine, **changes)
    app = create_app(api_settings)
    housekeeper_app = create_celery_app(api_settings)
    housekeeper = Housekeeper.for_app(housekeeper_app)
    client = app.test_client()
    auth = bearer(identity.token)

    def explode() -> None:
        svc = services()  # a frame whose locals hold the settings, as any view's do
        raise RuntimeError(f"boom in {type(svc).__name__}")

    app.add_url_rule("/explode", view_func=explode)
    try:
        hook = client.post(
            "/v1/webhooks", json={"url": receiver, "events": ["job.failed"]}, headers=auth
        )
        assert hook.status_code == 201, hook.get_json()
        body = {"type": "system.fail", "payload": {"message": "failed on purpose"}}
        job = client.post("/v1/jobs", json=body, headers=auth).get_json()

        def delivery_failed_in_the_log() -> bool:
            housekeeper.promote()  # queues the delivery the worker's finish left to beat,
            housekeeper.dispatch()  # and publishes it
            return bool(Receiver.received) and "HTTP 500" in worker.log_path.read_text()

        wait_for(delivery_failed_in_the_log, timeout=60, interval=0.2)
        assert client.get(f"/v1/jobs/{job['id']}", headers=auth).get_json()["state"] == "failed"
        assert client.get("/explode").status_code == 500
    finally:
        worker.stop()
        housekeeper_app.conveyor.engine.dispose()
        app.extensions["conveyor"].engine.dispose()
        configure_logging(settings)
    api_output = "\n".join(capsys.readouterr())
    worker_output = worker.log_path.read_text() + worker.log_path.with_suffix(".out").read_text()
    # The failures were logged, with their tracebacks: the check below is not vacuous.
    assert "failed on purpose" in worker_output
    assert "DeliveryFailed" in worker_output
    assert "RuntimeError: boom in" in api_output
    headers, _ = Receiver.received[0]
    values = {
        "secret key": process_env(api_settings)["CONVEYOR_SECRET_KEY"],
        "database password": DATABASE_PASSWORD,
        "flower password": FLOWER_PASSWORD,
        "metrics token": METRICS_TOKEN,
        "webhook secret": hook.get_json()["secret"],
        "signature header": headers[SIGNATURE_HEADER].split("v1=")[-1],
    }
    assert_no_secret(worker_output, values)
    assert_no_secret(api_output, values)
