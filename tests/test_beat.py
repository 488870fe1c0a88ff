"""Beat as the Procfile runs it: JSON log lines, and its housekeeping counted on its own
metrics exporter."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_depth, queue_lists
from conveyor.settings import Settings
from devtools.embedded import free_port
from tests.conftest import wait_for
from tests.factories import job_factory
from tests.processes import BIN, ROOT, own_queue, process_env, stop
from tests.test_metrics import BEARER, TOKEN, fetch, parse, status_of, value

pytestmark = pytest.mark.e2e


def test_beat_logs_json_and_exports_what_it_redrives(
    settings: Settings,
    identity: Identity,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    redis_client: Redis,
) -> None:
    mine = own_queue(settings, "beat")
    with sessions.begin() as session:
        job = job_factory(session, identity.tenant.id)
        job.queue, job.state = mine.default_queue, "retrying"
        job.scheduled_for = datetime.now(UTC) - timedelta(seconds=1)
    port = free_port()
    env = process_env(
        mine,
        CONVEYOR_PROMOTE_INTERVAL="0.2",
        CONVEYOR_BEAT_METRICS_PORT=str(port),
        CONVEYOR_METRICS_TOKEN=TOKEN,
    )
    log_path = tmp_path / "beat.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "worker.main",
                "beat",
                "--loglevel=INFO",
                f"--schedule={tmp_path / 'celerybeat-schedule'}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    exporter = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: queue_depth(redis_client, mine.default_queue) == 1, timeout=30)
        wait_for(lambda: status_of(exporter) == 401, timeout=10)
        # The counter moves just after the publish the queue shows: wait for it too.
        samples = wait_for(
            lambda: (
                (found := parse(fetch(exporter, BEARER)))
                and value(found, "conveyor_jobs_redriven_total", reason="promoted") == 1
                and found
            ),
            timeout=10,
        )
    finally:
        stop(proc, timeout=20)
        redis_client.delete(*queue_lists(mine.default_queue))
    assert value(samples, "conveyor_jobs_redriven_total", reason="promoted") == 1
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    loggers = {line["logger"] for line in lines}
    assert {"celery.beat", "worker.housekeeping"} <= loggers, loggers
