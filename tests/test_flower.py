"""Flower as `make run` and compose start it: a login on every page and on `/metrics`, a URL
prefix, history on disk; and a real browser that logs in and sees a worker and a job."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_lists
from conveyor.settings import Settings
from devtools.embedded import free_port
from tests.browser import ARTIFACTS, CHROMIUM_FLAGS, chromium
from tests.conftest import TEST_SECRET_KEY, wait_for
from tests.processes import ROOT, WorkerProcess, own_queue, process_env, start_worker, stop
from worker.flower import flower_environment, protect_flower_metrics

PASSWORD = "flower-test-password"
PREFIX = "flower"


def test_flower_options_come_from_settings(tmp_path: Path) -> None:
    env = flower_environment(
        Settings(
            secret_key=TEST_SECRET_KEY,
            flower_password="pw",
            data_dir=str(tmp_path),
            flower_port=5999,
            flower_url_prefix="/ops/",
        )
    )
    assert env["FLOWER_BASIC_AUTH"] == "admin:pw"
    assert (env["FLOWER_PORT"], env["FLOWER_URL_PREFIX"]) == ("5999", "ops")
    assert (env["FLOWER_PERSISTENT"], env["FLOWER_DB"]) == ("true", str(tmp_path / "flower.db"))
    plain = Settings(secret_key=TEST_SECRET_KEY, flower_password="pw")
    assert "FLOWER_URL_PREFIX" not in flower_environment(plain)


def test_development_without_a_password_gets_one_in_a_private_file(tmp_path: Path) -> None:
    env = flower_environment(
        Settings(env="development", secret_key=TEST_SECRET_KEY, data_dir=str(tmp_path))
    )
    saved = tmp_path / "flower-password"
    assert env["FLOWER_BASIC_AUTH"] == f"admin:{saved.read_text().strip()}"
    assert oct(saved.stat().st_mode & 0o777) == "0o600"


def test_metrics_handler_is_swapped_for_an_authenticated_one() -> None:
    from flower import urls
    from flower.views.monitor import Metrics

    protect_flower_metrics()
    (handler,) = [e[1] for e in urls.handlers if isinstance(e, tuple) and e[0] == r"/metrics"]
    assert handler is not Metrics
    assert issubclass(handler, Metrics)


@dataclass
class FlowerRun:
    """A running Flower, the worker it watches, and how to reach them."""

    url: str
    worker: WorkerProcess
    settings: Settings


def basic(user: str = "admin", password: str = PASSWORD) -> dict[str, str]:
    """Return a basic-auth header."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    """Return the HTTP status of a GET."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10):
            return 200
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except OSError:
        return 0


def get_json(url: str) -> Any:
    """GET with Flower's login and parse the JSON."""
    with urllib.request.urlopen(urllib.request.Request(url, headers=basic()), timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def flower(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerRun]:
    """Run a worker and `python -m worker.flower` (under /flower) on this run's Redis."""
    mine = own_queue(settings, "flower")
    tmp = tmp_path_factory.mktemp("flower")
    worker = start_worker(mine, tmp)
    port = free_port()
    env = process_env(
        mine,
        CONVEYOR_FLOWER_PASSWORD=PASSWORD,
        CONVEYOR_FLOWER_PORT=str(port),
        CONVEYOR_FLOWER_URL_PREFIX=PREFIX,
        CONVEYOR_DATA_DIR=str(tmp / "data"),
    )
    with (tmp / "flower.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.flower"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/{PREFIX}"
    try:
        wait_for(lambda: status_of(f"{url}/healthcheck") == 200, timeout=60, interval=0.2)
        wait_for(lambda: worker.node in get_json(f"{url}/api/workers?refresh=1"), timeout=30)
        yield FlowerRun(url, worker, mine)
    finally:
        stop(proc, timeout=20)
        worker.stop()
        Redis.from_url(mine.redis_url.get_secret_value()).delete(*queue_lists(mine.default_queue))
    # Flower saved its history where the settings say, for the next start to load.
    assert list((tmp / "data").glob("flower.db*"))


@pytest.fixture(scope="module")
def finished_job(flower: FlowerRun, identity_for_flower: Identity) -> str:
    """Run a system.noop through the API and the worker; return its id once Flower has it."""
    app = create_app(flower.settings)
    auth = {"Authorization": f"Bearer {identity_for_flower.token}"}
    job_id: str = (
        app.test_client().post("/v1/jobs", json={"type": "system.noop"}, headers=auth).json["id"]
    )
    app.extensions["conveyor"].engine.dispose()

    def seen() -> bool:
        task = get_json(f"{flower.url}/api/tasks").get(job_id)
        return bool(task and task["state"] == "SUCCESS")

    wait_for(seen, timeout=30)
    return job_id


@pytest.fixture(scope="module")
def identity_for_flower(settings: Settings) -> Iterator[Identity]:
    """A tenant for this module's job (the function-scoped `identity` cannot serve a module)."""
    from datetime import UTC, datetime

    from conveyor.auth.bootstrap import create_tenant_identity
    from conveyor.db import create_db_engine, create_session_factory
    from conveyor.models import Tenant

    engine = create_db_engine(settings)
    with create_session_factory(engine).begin() as session:
        made = create_tenant_identity(
            session,
            settings.secret_key.get_secret_value(),
            tenant_name="Flower",
            email="ops@flower.test",
            now=datetime.now(UTC),
        )
    yield made
    with create_session_factory(engine).begin() as session:
        tenant = session.get(Tenant, made.tenant.id)
        if tenant is not None:  # another test's clean-up may have emptied the tables
            session.delete(tenant)
    engine.dispose()


@pytest.mark.e2e
def test_every_page_and_metrics_need_the_login(flower: FlowerRun, finished_job: str) -> None:
    for path in ("/", "/tasks", "/api/workers", "/metrics"):
        assert status_of(f"{flower.url}{path}") == 401, path
        assert status_of(f"{flower.url}{path}", basic(password="wrong")) == 401, path
    assert status_of(f"{flower.url}/metrics", basic()) == 200
    with urllib.request.urlopen(
        urllib.request.Request(f"{flower.url}/metrics", headers=basic()), timeout=10
    ) as response:
        assert 'flower_events_total{task="system.noop"' in response.read().decode()
    # Only the liveness probe stays open, and it says nothing but OK.
    assert status_of(f"{flower.url}/healthcheck") == 200


@pytest.mark.e2e
def test_a_browser_logs_in_and_sees_the_worker_and_the_job(
    flower: FlowerRun, finished_job: str
) -> None:
    executable = chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(
                http_credentials={"username": "admin", "password": PASSWORD},
                viewport={"width": 1400, "height": 800},
            )
            page = context.new_page()
            page.goto(f"{flower.url}/workers", wait_until="networkidle")
            row = page.locator("tr", has_text=flower.worker.node)
            row.wait_for(timeout=15_000)
            assert "Online" in row.inner_text()
            page.screenshot(path=str(ARTIFACTS / "flower-workers.png"), full_page=True)

            page.goto(f"{flower.url}/tasks", wait_until="networkidle")
            task = page.locator("tr", has_text=finished_job)
            task.wait_for(timeout=15_000)
            text = task.inner_text()
            assert "system.noop" in text
            assert "SUCCESS" in text
            page.screenshot(path=str(ARTIFACTS / "flower.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "flower.png").stat().st_size > 10_000
