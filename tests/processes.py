"""Real Conveyor processes for tests: a `celery worker` as the Procfile runs it, on this
run's servers, each on a queue of its own; stopped by pid, never by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from conveyor.broker.config import create_celery
from conveyor.settings import Settings
from tests.conftest import fresh_queue, wait_for

ROOT = Path(__file__).resolve().parent.parent


def stop(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """SIGTERM a process this test started, and SIGKILL it if it outstays `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


BIN = Path(sys.executable).parent


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Return an environment whose `Settings()` equals the test settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        CONVEYOR_ENV=settings.env,
        CONVEYOR_SECRET_KEY=settings.secret_key.get_secret_value(),
        CONVEYOR_DATABASE_URL=settings.database_url.get_secret_value(),
        CONVEYOR_REDIS_URL=settings.redis_url.get_secret_value(),
        CONVEYOR_DEFAULT_QUEUE=settings.default_queue,
        CONVEYOR_DB_POOL_SIZE="2",
        CONVEYOR_RATE_LIMIT_PREFIX=settings.rate_limit_prefix,
        CONVEYOR_AUTH_RATE_LIMIT_IP=settings.auth_rate_limit_ip,
        CONVEYOR_AUTH_RATE_LIMIT_EMAIL=settings.auth_rate_limit_email,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if settings.broker_url:  # a `brokers` test on RabbitMQ
        env["CONVEYOR_BROKER_URL"] = settings.broker_url.get_secret_value()
    env.update(extra)
    return env


def own_queue(settings: Settings, prefix: str) -> Settings:
    """Return the settings with a queue no other test's worker consumes."""
    return settings.model_copy(update={"default_queue": fresh_queue(settings, prefix)})


@dataclass
class WorkerProcess:
    """A `celery -A worker.main worker` subprocess and the file its logs go to."""

    proc: subprocess.Popen[bytes]
    node: str
    log_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        """Return the worker's log lines, each parsed as JSON (a line that is not fails)."""
        text = self.log_path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the worker (warm shutdown on SIGTERM) and wait for it to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def control_app(settings: Settings) -> Celery:
    """Return a Celery app that only talks to the broker (ping, inspect)."""
    return create_celery(settings, name="test-control")


def start_worker(
    settings: Settings, log_dir: Path, *, concurrency: int = 1, **env: str
) -> WorkerProcess:
    """Start a prefork worker on `settings.default_queue`; return once it answers a ping."""
    node = f"test-{uuid.uuid4().hex[:8]}@127.0.0.1"
    log_path = log_dir / f"{node.split('@')[0]}.log"
    # Log lines go to stderr; Celery prints its banner and shutdown notes on stdout.
    out_path = log_path.with_suffix(".out")
    with log_path.open("wb") as log, out_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "worker.main",
                "worker",
                "--loglevel=INFO",
                f"--concurrency={concurrency}",
                "-n",
                node,
            ],
            cwd=ROOT,
            env=process_env(settings, **env),
            stdout=out,
            stderr=log,
        )
    worker = WorkerProcess(proc, node, log_path)
    app = control_app(settings)
    try:

        def answers() -> bool:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            return bool(app.control.ping(destination=[node], timeout=0.5))

        wait_for(answers, timeout=60, interval=0.2)
    except BaseException:
        worker.stop(signal.SIGKILL)
        raise
    # No `app.pool.force_close_all()`: kombu's pools are global per broker URL, and
    # closing this one would close the API's publisher pool too.
    return worker
