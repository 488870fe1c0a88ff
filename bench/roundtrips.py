"""Count database and Redis round trips per request and per job, a companion to `make bench`.

Throughput on a shared machine drifts; round trips do not. This drives the real API
(Flask's test client) and the real task runner in-process on embedded servers (or
`BENCH_DATABASE_URL` / `BENCH_REDIS_URL`) and counts, per operation, pre-pings (if the
pool pings at checkout), BEGINs, statements and COMMITs, and every Redis round trip (a
pipeline is one) with the commands it carried, whichever client sent it (the rate
limiter's, the broker's, the snapshots'). Usage: `python -m bench.roundtrips`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from redis.connection import AbstractConnection
from sqlalchemy import Connection, Engine, event

from bench.run import BIN, ROOT, servers
from conveyor.auth.roles import Role
from conveyor.cli import create_tenant
from conveyor.settings import Settings
from devtools.embedded import create_database

REPEAT = 20


def watch(engine: Engine) -> Counter[str]:
    """Count what `engine` sends to PostgreSQL from now on."""
    counts: Counter[str] = Counter()

    def sent(name: str) -> Callable[..., None]:
        def count(conn: Connection, *_: Any) -> None:
            # On an autocommit connection the driver sends no BEGIN, COMMIT or ROLLBACK.
            autocommit = conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
            if not autocommit:
                counts.update([name])

        return count

    if getattr(engine.pool, "_pre_ping", False):
        event.listen(engine, "checkout", lambda *_: counts.update(["checkout (pre-ping)"]))
    event.listen(engine, "before_cursor_execute", lambda *_: counts.update(["statement"]))
    for name in ("begin", "commit", "rollback"):
        event.listen(engine, name, sent(name))
    return counts


def command_names(packed: bytes | list[bytes]) -> list[str]:
    """Return the names of the commands in one packed (RESP) write to Redis."""
    data = packed.encode() if isinstance(packed, str) else b"".join(packed)
    names, at = [], 0
    while at < len(data):
        end = data.index(b"\r\n", at)
        assert data[at : at + 1] == b"*", "a command is a RESP array of bulk strings"
        parts, at = int(data[at + 1 : end]), end + 2
        for index in range(parts):
            end = data.index(b"\r\n", at)
            size, at = int(data[at + 1 : end]), end + 2
            if index == 0:
                names.append(data[at : at + size].decode().upper())
            at += size + 2
    return names


@contextlib.contextmanager
def watch_redis() -> Iterator[Counter[str]]:
    """Count every Redis round trip of this process, by any client, and its commands."""
    counts: Counter[str] = Counter()
    send = AbstractConnection.send_packed_command

    def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        # One write, then its replies: a pipeline is one round trip whatever it carries.
        counts.update(["round trips"])
        counts.update(command_names(command))
        send(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]


def per_call(
    counts: Counter[str], action: Callable[[], Any], redis: Counter[str] | None = None
) -> dict[str, Any]:
    """Run `action` REPEAT times (after one warm-up) and return its average counts."""
    action()
    counts.clear()
    if redis is not None:
        redis.clear()
    for _ in range(REPEAT):
        action()
    out: dict[str, Any] = {k: v / REPEAT for k, v in sorted(counts.items())}
    out["round trips"] = sum(out.values())
    if redis is not None:
        out["redis"] = {k: v / REPEAT for k, v in sorted(redis.items())}
    return out


def main() -> int:
    """Print database and Redis round trips per submit, poll, batch of 100 and job run."""
    root = Path(tempfile.mkdtemp(prefix="conveyor-roundtrips-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        report = _count(root)
    print(json.dumps(report, indent=2))
    return 0


def _count(root: Path) -> dict[str, dict[str, Any]]:
    with servers(root) as (pg_url, redis_url), watch_redis() as redis:
        db = create_database(pg_url, f"roundtrips_{os.getpid()}_{time.time_ns()}")
        secret = secrets.token_urlsafe(32)
        env = {
            **os.environ,
            "CONVEYOR_DATABASE_URL": db,
            "CONVEYOR_REDIS_URL": redis_url,
            "CONVEYOR_SECRET_KEY": secret,
        }
        subprocess.run(
            [BIN / "conveyor", "migrate"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        settings = Settings(database_url=db, redis_url=redis_url, secret_key=secret)
        key = create_tenant(
            settings, name="RT", email="rt@conveyor.local", password=None, key_role=Role.MEMBER
        )["api_key"]
        from api import create_app
        from worker.app import create_celery_app

        app = create_app(settings)
        client = app.test_client()
        auth = {"Authorization": f"Bearer {key}"}
        counts = watch(app.extensions["conveyor"].engine)
        noop = {"type": "system.noop", "payload": {}}
        ids: list[str] = []

        def submit() -> None:
            response = client.post("/v1/jobs", json=noop, headers=auth)
            assert response.status_code == 202, response.data
            ids.append(response.get_json()["id"])

        def batch() -> None:
            response = client.post("/v1/jobs/batch", json={"jobs": [noop] * 100}, headers=auth)
            assert response.status_code == 202, response.data

        def poll() -> None:
            response = client.get(f"/v1/jobs/{ids[0]}", headers=auth)
            assert response.status_code == 200, response.data

        report = {
            "POST /v1/jobs": per_call(counts, submit, redis),
            "GET /v1/jobs/{id}": per_call(counts, poll, redis),
            "POST /v1/jobs/batch (100 jobs)": per_call(counts, batch, redis),
        }
        celery = create_celery_app(settings)
        services = celery.conveyor
        worker_counts = watch(services.engine)
        from worker.runner import run_job

        def run_one() -> None:
            assert run_job(services, ids.pop()) == "succeeded"

        report["worker: run one system.noop"] = per_call(worker_counts, run_one, redis)
        services.engine.dispose()
        app.extensions["conveyor"].engine.dispose()
    return report


if __name__ == "__main__":
    sys.exit(main())
