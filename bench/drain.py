"""The worker drain alone, with the CPU each drained job costs, per process group.

`make bench`'s drain phase (a freshly started worker runs jobs that wait: Conveyor's
`system.noop` ledger jobs, submitted by the batch endpoint with the beat's dispatcher
running; the baseline's raw Celery no-ops), without the other phases, so a change to the
claim/finish path is measured in a minute or two. Between the first job finished and the
last, it samples the CPU time of the worker (parent and pool), the beat, PostgreSQL's
processes, Redis and the api, and reports milliseconds of CPU per job for each, with
jobs/s. Rounds alternate the stacks. Usage, under the shared load lock:
`python -m bench.drain [--jobs 2000] [--rounds 3] [--only conveyor|bare]`.
Embedded PostgreSQL and Valkey, as `make bench` (or `BENCH_DATABASE_URL`/`BENCH_REDIS_URL`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import redis
from sqlalchemy import create_engine, text

from bench.loadgen import post_json
from bench.processes import BIN, ROOT, servers, start, stop, wait_http, wait_log
from bench.run import BARE_SCHEMA, NOOP, WORKER_CONCURRENCY, drain_queue, log, member_tenant
from conveyor.broker.inspect import queue_depth
from conveyor.broker.internals import UNACKED_KEY
from conveyor.settings import Settings
from devtools.embedded import create_database, free_port

Groups = dict[str, Callable[[], list[psutil.Process]]]


def _tree(proc: subprocess.Popen[bytes] | None) -> list[psutil.Process]:
    if proc is None:
        return []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    return []


def _matching(needle: str, names: tuple[str, ...]) -> Callable[[], list[psutil.Process]]:
    """Return a finder of the processes named like `names` whose command line has `needle`."""

    def find() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["name", "cmdline"]):
            name = p.info["name"] or ""
            if any(n in name for n in names) and needle in " ".join(p.info["cmdline"] or []):
                found.append(p)
        return found

    return find


def _postgres(pgdata: Path) -> Callable[[], list[psutil.Process]]:
    def find() -> list[psutil.Process]:
        pidfile = pgdata / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            root = psutil.Process(int(pidfile.read_text().split()[0]))
            return [root, *root.children(recursive=True)]
        return []

    return find


def cpu(groups: Groups) -> dict[str, float]:
    """Return each group's CPU seconds so far (user + system, live processes)."""
    out = {}
    for name, find in groups.items():
        total = 0.0
        for p in find():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        out[name] = total
    return out


@contextlib.contextmanager
def running(
    cmd: list[str], env: dict[str, str], logfile: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a process for the block; stop it by pid afterwards."""
    proc = start(cmd, env, logfile)
    try:
        yield proc
    finally:
        stop(proc)


def drain(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    logs: Path,
    remaining: Callable[[], int],
    groups: Groups,
    n: int,
) -> dict[str, float]:
    """Start a worker on `n` waiting jobs; return jobs/s and CPU ms per job per group."""
    logfile = logs / f"{name}-worker.log"
    pending = remaining()
    with running(cmd, env, logfile) as worker:
        groups = {"worker": lambda: _tree(worker), **groups}
        started = before = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            left = remaining()
            if started is None and left < pending:
                started, before, done_before = time.monotonic(), cpu(groups), pending - left
            if left == 0 and started is not None:
                elapsed, after = time.monotonic() - started, cpu(groups)
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"{name} drain did not finish")
    assert before is not None
    jobs = n - done_before
    result = {"jobs_per_s": jobs / elapsed}
    result |= {f"{g}_ms": 1000 * (after[g] - before[g]) / jobs for g in groups}
    result["total_ms"] = sum(v for k, v in result.items() if k.endswith("_ms"))
    return result


def main(argv: list[str] | None = None) -> int:
    """Measure the drain of both stacks (or one), alternating, and print medians as JSON."""
    parser = argparse.ArgumentParser(prog="bench.drain")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per round (x1000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["conveyor", "bare"])
    args = parser.parse_args(argv)
    n = max(1000, args.jobs // 1000 * 1000)
    with tempfile.TemporaryDirectory(prefix="conveyor-drain-") as tmp:
        root = Path(tmp)
        with servers(root) as (pg_url, redis_url):
            results = _run(args, n, root, pg_url, redis_url)
    medians = {
        stack: {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
        for stack, rounds in results.items()
    }
    print(json.dumps({"jobs": n, "rounds": results, "median": medians}, indent=1))
    return 0


def _run(
    args: argparse.Namespace, n: int, root: Path, pg_url: str, redis_url: str
) -> dict[str, list[dict[str, float]]]:
    conveyor_db = create_database(pg_url, "conveyor_drain")
    bare_db = create_database(pg_url, "bare_drain")
    logs = root / "logs"
    logs.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "PYTHONPATH": str(ROOT),
        "CONVEYOR_DATABASE_URL": conveyor_db,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_SECRET_KEY": secrets.token_urlsafe(32),
        "CONVEYOR_DATA_DIR": str(root),
        "CONVEYOR_LOG_LEVEL": "INFO",
        "BARE_DATABASE_URL": bare_db,
    }
    os.environ.update(
        {k: env[k] for k in ("BARE_DATABASE_URL", "CONVEYOR_REDIS_URL", "CONVEYOR_SECRET_KEY")}
    )
    subprocess.run([BIN / "conveyor", "migrate"], env=env, cwd=ROOT, check=True)
    bare_engine = create_engine(Settings(database_url=bare_db).sqlalchemy_url)
    with bare_engine.begin() as conn:
        conn.execute(text(BARE_SCHEMA))
    bare_engine.dispose()
    settings = Settings(database_url=conveyor_db, redis_url=redis_url)
    key = member_tenant(settings, "Drain")["api_key"]
    engine = create_engine(settings.sqlalchemy_url, pool_size=1)
    r = redis.Redis.from_url(redis_url)
    port = free_port()
    celery = [str(BIN / "celery")]
    worker = [
        *celery,
        "-A",
        "worker.main",
        "worker",
        "--loglevel=INFO",
        f"--concurrency={WORKER_CONCURRENCY}",
    ]
    bare_worker = [
        *celery,
        "-A",
        "bench.bare_worker",
        "worker",
        "--loglevel=INFO",
        f"--concurrency={WORKER_CONCURRENCY}",
        "-Q",
        "bare",
    ]
    api_cmd = [
        str(BIN / "gunicorn"),
        "--workers",
        "2",
        "--config",
        "python:api.gunicorn_config",
        "--bind",
        f"127.0.0.1:{port}",
        "api:create_app()",
    ]
    beat_cmd = [
        *celery,
        "-A",
        "worker.main",
        "beat",
        "--loglevel=INFO",
        f"--schedule={root / 'beat-schedule'}",
    ]
    shared: Groups = {
        "postgres": _postgres(root / "pgdata"),
        "redis": _matching(redis_url.rsplit(":", 1)[1].split("/")[0], ("valkey", "redis")),
    }

    def unfinished() -> int:
        with engine.connect() as conn:
            query = text("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
            return int(conn.execute(query).scalar_one())

    def in_broker() -> int:
        return queue_depth(r, "bare") + int(r.hlen(UNACKED_KEY))

    results: dict[str, list[dict[str, float]]] = {}
    stacks = [s for s in ("conveyor", "bare") if args.only in (None, s)]
    headers = {"Authorization": f"Bearer {key}"}
    with (
        running(api_cmd, env, logs / "api.log") as api,
        running(beat_cmd, env, logs / "beat.log") as beat,
    ):
        wait_http(port)
        wait_log(logs / "beat.log", b"this beat leads dispatch")
        groups = {**shared, "beat": lambda: _tree(beat), "api": lambda: _tree(api)}
        for round_ in range(args.rounds):
            for name in stacks if round_ % 2 == 0 else stacks[::-1]:
                log(f"round {round_ + 1}: {name} drain of {n}")
                if name == "conveyor":
                    for _ in range(n // 1000):
                        post_json(port, "/v1/jobs/batch", {"jobs": [NOOP] * 1000}, headers)
                    out = drain(name, worker, env, logs, unfinished, groups, n)
                else:
                    from bench.bare_worker import app as bare_celery

                    drain_queue(r, "bare")
                    with bare_celery.producer_or_acquire() as producer:
                        for _ in range(n):
                            bare_celery.send_task("bare.noop", queue="bare", producer=producer)
                    out = drain(name, bare_worker, env, logs, in_broker, shared, n)
                log(json.dumps({k: round(v, 3) for k, v in out.items()}))
                results.setdefault(name, []).append(out)
    engine.dispose()
    return results


if __name__ == "__main__":
    raise SystemExit(main())
