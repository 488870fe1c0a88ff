"""`make run`'s launcher: the whole platform up on embedded servers, a job through it, and
nothing left running after SIGTERM; a restart keeps the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy.orm import Session, sessionmaker

from conveyor.settings import Settings
from devtools.devstack import banner, ensure_dev_credentials
from devtools.embedded import free_port
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_dev_credentials_are_created_once_and_reused(
    committed: None, settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    path = tmp_path / "creds.json"
    first, created = ensure_dev_credentials(settings, path)
    assert created
    assert first.api_key.startswith("cvk_")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again, created_again = ensure_dev_credentials(settings, path)
    assert (again, created_again) == (first, False)
    text = banner(first, created, "http://127.0.0.1:9", 5555)
    assert f"Bearer {first.api_key}" in text
    assert "http://127.0.0.1:9/v1/jobs" in text
    # The console's address, and the login it takes, are printed beside the API's.
    assert "Console  http://127.0.0.1:9/console/" in text
    assert f"Admin    {first.email}, password {first.password}" in text


def request(url: str, headers: dict[str, str], body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=5) as response:
        return json.load(response)


def server_pids(data_dir: Path) -> list[int]:
    """Return the embedded PostgreSQL and Valkey pids from their pid files."""
    pids = []
    for pidfile in (data_dir / "pgdata" / "postmaster.pid", data_dir / "redis" / "valkey.pid"):
        if pidfile.exists():
            pids.append(int(pidfile.read_text().split()[0]))
    return pids


@contextmanager
def devstack(
    data_dir: Path, api_port: int, flower_port: int, up_within: float = 90, **extra_env: str
) -> Iterator[list[str]]:
    """Run `python -m devtools.devstack run` as `make run` does; SIGTERM it on the way out
    and check that every process it started, directly or not, is gone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(extra_env)
    env.update(
        CONVEYOR_DATA_DIR=str(data_dir),
        CONVEYOR_API_BIND=f"127.0.0.1:{api_port}",
        CONVEYOR_FLOWER_PORT=str(flower_port),
        CONVEYOR_API_WORKERS="1",
        CONVEYOR_WORKER_CONCURRENCY="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.devstack", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    started: list[psutil.Process] = []
    try:
        wait_for(lambda: any("Conveyor is up" in line for line in lines), timeout=up_within)
        launcher = psutil.Process(proc.pid)
        started = [*launcher.children(recursive=True), *map(psutil.Process, server_pids(data_dir))]
        # api, worker (parent and child), beat, flower, honcho, both servers at the least
        assert len(started) >= 8, started
        yield lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]
    assert proc.returncode == 0, "".join(lines[-40:])
    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == [], [p.cmdline() for p in alive]


@pytest.mark.e2e
def test_make_run_serves_a_job_stops_cleanly_and_keeps_jobs(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    api_port, flower_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    with devstack(data_dir, api_port, flower_port) as output:
        creds = json.loads((data_dir / "dev-credentials.json").read_text())
        assert any(creds["api_key"] in line for line in output)
        auth = {"Authorization": f"Bearer {creds['api_key']}", "Content-Type": "application/json"}
        assert any(creds["password"] in line for line in output)
        signin = {"email": creds["email"], "password": creds["password"]}
        login = request(f"{api}/v1/auth/login", {"Content-Type": "application/json"}, signin)
        assert login["token_type"] == "bearer"
        job = request(f"{api}/v1/jobs", auth, {"type": "system.noop"})
        done = wait_for(
            lambda: request(f"{api}/v1/jobs/{job['id']}", auth)["state"] == "succeeded",
            timeout=30,
        )
        assert done
        flower = f"http://127.0.0.1:{flower_port}/api/workers"
        with pytest.raises(urllib.error.HTTPError) as denied:
            request(flower, {})
        assert denied.value.code == 401
        denied.value.close()
        basic = b64encode(f"admin:{creds['flower_password']}".encode()).decode()
        assert request(flower, {"Authorization": f"Basic {basic}"}) is not None
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()

    with devstack(data_dir, api_port, flower_port) as output:
        assert any("from .conveyor/dev-credentials.json" in line for line in output)
        assert request(f"{api}/v1/jobs/{job['id']}", auth)["state"] == "succeeded"
