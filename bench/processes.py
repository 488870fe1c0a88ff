"""Servers and processes shared by `make bench` and `make soak`: started and stopped by pid.

Each process runs in its own session (so a Ctrl-C at the terminal reaches only the driver,
which then stops every process it started, by pid), with its output in a log file.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.loadgen import wrk_available
from devtools.embedded import EmbeddedPostgres, EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
# `${NAME:-default}` in a Procfile line, as honcho's shell would expand it.
PROCFILE_VAR = re.compile(r"\$\{(\w+):-([^}]*)\}")


def start(cmd: list[str], env: dict[str, str], logfile: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own session, its output to `logfile`."""
    out = logfile.open("ab")
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a process and its children by pid: SIGTERM, then SIGKILL after 20 s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in tree[1:]:
        with contextlib.suppress(psutil.Error):
            child.kill()


def wait_http(port: int, path: str = "/healthz", timeout: float = 60) -> None:
    """Wait until the api answers on `port` (any status), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port}")


def wait_log(logfile: Path, needle: bytes, offset: int = 0, timeout: float = 60) -> None:
    """Wait until `needle` appears in `logfile` after `offset`, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with logfile.open("rb") as fh:
            fh.seek(offset)
            if needle in fh.read():
                return
        time.sleep(0.1)
    raise RuntimeError(f"no {needle!r} in {logfile} within {timeout}s")


def wait_worker_ready(logfile: Path, offset: int, timeout: float = 60) -> None:
    """Wait for Celery's 'ready.' line in the worker's log after `offset`."""
    wait_log(logfile, b"ready.", offset, timeout)


def procfile_commands(env: dict[str, str], path: Path = ROOT / "Procfile") -> dict[str, list[str]]:
    """Return the Procfile's commands by process name, `${VAR:-default}` expanded from `env`."""
    commands = {}
    for line in path.read_text().splitlines():
        name, sep, command = line.partition(":")
        if not sep or not name.strip() or name.lstrip().startswith("#"):
            continue
        expanded = PROCFILE_VAR.sub(lambda m: env.get(m.group(1)) or m.group(2), command)
        commands[name.strip()] = shlex.split(expanded)
    return commands


@contextlib.contextmanager
def servers(root: Path) -> Iterator[tuple[str, str]]:
    """Yield an admin PostgreSQL URL and a Redis URL: given ones, or embedded throwaways."""
    pg_url, redis_url = os.environ.get("BENCH_DATABASE_URL"), os.environ.get("BENCH_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if not pg_url:
            postgres = EmbeddedPostgres(root / "pgdata")
            stack.callback(postgres.stop)
            pg_url = postgres.start()
        if not redis_url:
            valkey = EmbeddedRedis(root / "redis", persist=False)
            stack.callback(valkey.stop)
            redis_url = valkey.start()
        yield pg_url, redis_url


def machine() -> dict[str, Any]:
    """Describe the machine the numbers come from."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1) if found else cpu
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "load_generator": "wrk" if wrk_available() else "python (wrk absent)",
    }


def git_commit() -> str:
    """Return the short commit the run measured."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
