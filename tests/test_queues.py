"""`GET /v1/queues` against a real prefork worker: depth, waits, running jobs, who runs them;
and the compose healthcheck's `celery inspect ping`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_lists
from conveyor.settings import Settings
from tests.conftest import wait_for
from tests.processes import BIN, ROOT, own_queue, process_env, start_worker

pytestmark = pytest.mark.e2e


@pytest.mark.brokers
def test_queues_show_depth_waits_running_jobs_and_workers(
    settings: Settings, identity: Identity, tmp_path: Path, redis_client: Redis
) -> None:
    mine = own_queue(settings, "queues").model_copy(update={"inspect_timeout": 0.5})
    worker = start_worker(mine, tmp_path, concurrency=1)
    app = create_app(mine)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {identity.token}"}
    try:
        # The compose healthcheck, verbatim but for the node name.
        ping = subprocess.run(
            [
                BIN / "celery",
                "-A",
                "worker.main",
                "inspect",
                "ping",
                "-d",
                worker.node,
                "--timeout",
                "5",
            ],
            cwd=ROOT,
            env=process_env(mine),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ping.returncode == 0, ping.stderr[-2000:]
        assert "pong" in ping.stdout

        sleep = {"type": "system.sleep", "payload": {"seconds": 3}}
        running_id = client.post("/v1/jobs", json=sleep, headers=auth).json["id"]
        wait_for(
            lambda: client.get(f"/v1/jobs/{running_id}", headers=auth).json["state"] == "running"
        )
        # One process, one message in hand: these two wait in the broker.
        for _ in range(2):
            client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth)
        body = client.get("/v1/queues", headers=auth).json
    finally:
        worker.stop()
        app.extensions["conveyor"].engine.dispose()
        if not mine.amqp_broker:  # RabbitMQ's queues go at the end of the run
            redis_client.delete(*queue_lists(mine.default_queue))
    (queue,) = [q for q in body["queues"] if q["name"] == mine.default_queue]
    assert (queue["depth"], queue["queued"], queue["running"]) == (2, 2, 1)
    assert queue["oldest_wait_seconds"] > 0
    assert queue["oldest_queued_at"] is not None
    workers = {w["name"]: w["active_job_ids"] for w in body["workers"]}
    assert workers[worker.node] == [running_id]


def test_recent_workers_answers_from_redis_and_asks_again_in_the_background(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from conveyor import queues
    from conveyor.queues import WORKERS_KEY, WORKERS_LOCK, WorkerInfo, recent_workers

    redis_client.delete(WORKERS_KEY, WORKERS_LOCK)
    asked: list[int] = []
    answered = threading.Event()

    def broadcast(app: Any, timeout: float) -> list[WorkerInfo]:
        asked.append(1)
        answered.set()
        return [WorkerInfo(f"w{len(asked)}", ["job"])]

    monkeypatch.setattr(queues, "online_workers", broadcast)
    # The very first caller waits for the broadcast; the next ones within max_age do not ask.
    assert recent_workers(None, redis_client, 1.0, 60) == [WorkerInfo("w1", ["job"])]  # type: ignore[arg-type]
    assert recent_workers(None, redis_client, 1.0, 60) == [WorkerInfo("w1", ["job"])]  # type: ignore[arg-type]
    assert len(asked) == 1
    # Once stale, the previous answer is shown at once while one caller asks again.
    answered.clear()
    assert recent_workers(None, redis_client, 1.0, 0) == [WorkerInfo("w1", ["job"])]  # type: ignore[arg-type]
    assert answered.wait(5)

    def refreshed() -> bool:
        return recent_workers(None, redis_client, 1.0, 60) == [WorkerInfo("w2", ["job"])]  # type: ignore[arg-type]

    wait_for(refreshed, timeout=5)
    assert len(asked) == 2
    redis_client.delete(WORKERS_KEY, WORKERS_LOCK)
