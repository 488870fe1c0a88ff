"""Prometheus metrics: exact totals across gunicorn workers and prefork children, the token,
queue gauges, and housekeeping's counters."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_lists
from conveyor.settings import Settings
from conveyor.telemetry.metrics import serve_metrics
from devtools.embedded import free_port
from tests.conftest import wait_for
from tests.factories import job_factory
from tests.processes import BIN, ROOT, own_queue, process_env, start_worker, stop
from worker.app import create_celery_app
from worker.housekeeping import Housekeeper

TOKEN = "metrics-token-for-tests"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Index a scrape's samples by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """Return one sample's value, 0 when the scrape has none."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def fetch(url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> str:
    """GET (or POST `body` as JSON) and return the text of a 2xx response."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    if body is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        text: str = response.read().decode()
        return text


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    """Return the HTTP status of a GET."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10):
            return 200
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def test_api_metrics_need_the_token_outside_development(settings: Settings) -> None:
    closed = create_app(settings)
    assert closed.test_client().get("/metrics").status_code == 403
    guarded = create_app(settings.model_copy(update={"metrics_token": SecretStr(TOKEN)}))
    response = guarded.test_client().get("/metrics", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    dev = create_app(settings.model_copy(update={"env": "development", "inspect_timeout": 0.2}))
    assert dev.test_client().get("/metrics").status_code == 200
    for app in (closed, guarded, dev):
        app.extensions["conveyor"].engine.dispose()


def test_api_metrics_count_requests_jobs_and_queues(
    settings: Settings, identity: Identity, redis_client: Any
) -> None:
    mine = own_queue(settings, "metrics").model_copy(
        update={"metrics_token": SecretStr(TOKEN), "inspect_timeout": 0.3}
    )
    app = create_app(mine)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {identity.token}"}
    submitted = REGISTRY.get_sample_value(
        "conveyor_jobs_submitted_total", {"type": "system.noop", "queue": mine.default_queue}
    )
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    for _ in range(2):  # no worker consumes this queue: they wait
        assert (
            client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).status_code == 202
        )
    samples = parse(client.get("/metrics", headers=BEARER).get_data(as_text=True))
    app.extensions["conveyor"].engine.dispose()
    redis_client.delete(*queue_lists(mine.default_queue))
    http = "flask_http_request_duration_seconds_count"
    assert value(samples, http, method="GET", endpoint="health.healthz", status="200") == 3
    assert value(samples, http, method="POST", endpoint="jobs.create", status="202") == 2
    assert value(samples, "flask_http_request_total", method="GET", status="200") == 3
    jobs = {"type": "system.noop", "queue": mine.default_queue}
    assert value(samples, "conveyor_jobs_submitted_total", **jobs) == (submitted or 0) + 2
    queue = {"queue": mine.default_queue}
    assert value(samples, "conveyor_queue_depth", **queue) == 2
    assert value(samples, "conveyor_queue_oldest_job_age_seconds", **queue) > 0
    assert value(samples, "conveyor_jobs_running", **queue) == 0
    assert ("conveyor_workers_online", frozenset()) in samples


@pytest.fixture
def gunicorn(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, psutil.Process, Path]]:
    """Run the Procfile's web command with 2 workers on a free port; stop it by pid."""
    port = free_port()
    prom_dir = tmp_path / "prom"
    env = process_env(
        settings.model_copy(update={"inspect_timeout": 0.3}),
        CONVEYOR_METRICS_TOKEN=TOKEN,
        CONVEYOR_INSPECT_TIMEOUT="0.3",
        PROMETHEUS_MULTIPROC_DIR=str(prom_dir),
    )
    command = [
        str(BIN / "gunicorn"),
        "--config",
        "python:api.gunicorn_config",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        "api:create_app()",
    ]
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        master = psutil.Process(proc.pid)
        # Probed on /readyz, so the test's /healthz count starts at zero.
        wait_for(lambda: len(master.children()) == 2 and status_of(f"{url}/readyz") == 200)
        yield url, master, prom_dir
    finally:
        stop(proc, timeout=30)
        log.close()


@pytest.mark.e2e
def test_totals_are_exact_across_two_gunicorn_workers(
    gunicorn: tuple[str, psutil.Process, Path], identity: Identity, settings: Settings
) -> None:
    url, master, prom_dir = gunicorn
    requests, jobs = 60, 12
    auth = {"Authorization": f"Bearer {identity.token}"}
    # Eight at a time: both sync workers get busy, so both serve a share.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: fetch(f"{url}/healthz"), range(requests)))
        submit = lambda _: fetch(f"{url}/v1/jobs", auth, b'{"type": "system.noop"}')  # noqa: E731
        list(pool.map(submit, range(jobs)))
    (private_dir,) = prom_dir.iterdir()  # api-<master pid>: emptied and ours alone
    writers = {p.stem.rsplit("_", 1)[1] for p in private_dir.glob("histogram_*.db")}
    assert writers == {str(c.pid) for c in master.children()}, "both workers served"
    assert status_of(f"{url}/metrics") == 401

    def totals() -> tuple[float, float, float]:
        samples = parse(fetch(f"{url}/metrics", BEARER))
        count = "flask_http_request_duration_seconds_count"
        healthz = value(samples, count, method="GET", endpoint="health.healthz", status="200")
        readyz = value(samples, count, method="GET", endpoint="health.readyz", status="200")
        all_gets = value(samples, "flask_http_request_total", method="GET", status="200")
        assert all_gets == healthz + readyz  # /metrics itself is not counted
        noop = {"type": "system.noop", "queue": settings.default_queue}
        return healthz, value(samples, "conveyor_jobs_submitted_total", **noop), all_gets

    healthz, submitted, all_gets = totals()
    assert (healthz, submitted) == (requests, jobs)
    # A worker that exits (max-requests, a crash) takes nothing with it: its files stay.
    before = {c.pid for c in master.children()}
    psutil.Process(min(before)).terminate()
    wait_for(lambda: len(set(c.pid for c in master.children()) - before) == 1)
    assert totals() == (healthz, submitted, all_gets)


@pytest.mark.e2e
def test_worker_metrics_sum_prefork_children(
    settings: Settings, identity: Identity, tmp_path: Path
) -> None:
    mine = own_queue(settings, "wmetrics")
    port = free_port()
    worker = start_worker(
        mine,
        tmp_path,
        concurrency=2,
        CONVEYOR_WORKER_METRICS_PORT=str(port),
        CONVEYOR_METRICS_TOKEN=TOKEN,
    )
    app = create_app(mine)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {identity.token}"}
    try:
        ids = [
            client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).json["id"]
            for _ in range(6)
        ]
        wait_for(
            lambda: all(
                client.get(f"/v1/jobs/{i}", headers=auth).json["state"] == "succeeded" for i in ids
            )
        )
        exporter = f"http://127.0.0.1:{port}/metrics"
        assert status_of(exporter) == 401
        samples = parse(fetch(exporter, BEARER))
    finally:
        worker.stop()
        app.extensions["conveyor"].engine.dispose()
    noop = {"type": "system.noop"}
    assert value(samples, "conveyor_jobs_finished_total", state="succeeded", **noop) == 6
    assert value(samples, "conveyor_job_run_seconds_count", **noop) == 6
    assert value(samples, "conveyor_job_queue_wait_seconds_count", **noop) == 6


def test_housekeeping_counts_what_it_redrives(
    settings: Settings, identity: Identity, sessions: sessionmaker[Session], redis_client: Any
) -> None:
    mine = own_queue(settings, "hk-metrics")
    app = create_celery_app(mine)
    with sessions.begin() as session:
        due = job_factory(session, identity.tenant.id)
        due.queue, due.state = mine.default_queue, "retrying"
        due.scheduled_for = datetime.now(UTC) - timedelta(seconds=1)
        lost = job_factory(
            session, identity.tenant.id, type_name="system.sleep", payload={"seconds": 1}
        )
        lost.queue, lost.state, lost.attempt = mine.default_queue, "running", 1
        lost.heartbeat_at = datetime.now(UTC) - timedelta(hours=1)

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (
        sample("conveyor_jobs_redriven_total", reason="promoted"),
        sample("conveyor_jobs_redriven_total", reason="reaped"),
        sample("conveyor_jobs_finished_total", type="system.sleep", state="retrying"),
    )
    try:
        assert Housekeeper.for_app(app).run_once() == (1, 1)
    finally:
        app.conveyor.engine.dispose()
        redis_client.delete(*queue_lists(mine.default_queue))
    after = (
        sample("conveyor_jobs_redriven_total", reason="promoted"),
        sample("conveyor_jobs_redriven_total", reason="reaped"),
        sample("conveyor_jobs_finished_total", type="system.sleep", state="retrying"),
    )
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]


def test_exporter_guards_its_port_with_the_token() -> None:
    port = free_port()
    server = serve_metrics("127.0.0.1", port, TOKEN)
    assert server is not None
    try:
        assert status_of(f"http://127.0.0.1:{port}/metrics") == 401
        assert "conveyor_jobs_finished" in fetch(f"http://127.0.0.1:{port}/metrics", BEARER)
        assert serve_metrics("127.0.0.1", port, TOKEN) is None  # taken: no crash
    finally:
        server.shutdown()
        server.server_close()
