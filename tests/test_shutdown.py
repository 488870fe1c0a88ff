"""Graceful shutdown: SIGTERM to a real prefork worker mid-job is a warm shutdown. The running
job finishes, once; a job still in the broker stays there and runs on the next worker."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_depth, queue_lists
from conveyor.settings import Settings
from tests.conftest import transitions, wait_for
from tests.processes import own_queue, start_worker

pytestmark = pytest.mark.e2e


def test_sigterm_mid_job_lets_it_finish_once_and_leaves_the_rest_queued(
    settings: Settings,
    identity: Identity,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    redis_client: Redis,
) -> None:
    mine = own_queue(settings, "shutdown")
    first = start_worker(mine, tmp_path, concurrency=1)
    app = create_app(mine)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {identity.token}"}
    second = None
    try:
        sleep = {"type": "system.sleep", "payload": {"seconds": 3}}
        running = client.post("/v1/jobs", json=sleep, headers=auth).json["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{running}", headers=auth).json["state"] == "running")
        waiting = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).json["id"]

        started = time.monotonic()
        assert first.stop(signal.SIGTERM, timeout=30) == 0  # warm: waits for the job
        assert time.monotonic() - started < 15
        assert client.get(f"/v1/jobs/{running}", headers=auth).json["state"] == "succeeded"
        assert transitions(sessions, running) == [
            (None, "queued"),
            ("queued", "running"),
            ("running", "succeeded"),
        ]
        # The stopping worker took nothing new: the other job waits in the broker...
        assert client.get(f"/v1/jobs/{waiting}", headers=auth).json["state"] == "queued"
        assert queue_depth(redis_client, mine.default_queue) == 1
        # ...and the next worker runs it, once.
        second = start_worker(mine, tmp_path, concurrency=1)
        wait_for(
            lambda: client.get(f"/v1/jobs/{waiting}", headers=auth).json["state"] == "succeeded"
        )
        assert transitions(sessions, waiting).count(("running", "succeeded")) == 1
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()
        app.extensions["conveyor"].engine.dispose()
        redis_client.delete(*queue_lists(mine.default_queue))
