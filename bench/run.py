"""`make bench`: measure Conveyor as deployed against the bare Flask + Celery stack.

One run starts (or is given) PostgreSQL and Redis, runs both stacks on them with the
Procfile's process settings, and reports medians of several rounds for each measure,
with Conveyor/baseline ratios. Every load loop is bounded in count and time and only
talks to 127.0.0.1. Usage: `python -m bench.run [--rounds 3] [--seconds 5]`.
Give `BENCH_DATABASE_URL` (an admin libpq URL) and `BENCH_REDIS_URL` to use your own servers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import redis
from sqlalchemy import Engine, create_engine, text

from bench import orders_csv
from bench.cpu import GROUPS, CpuMeter, listening_pid
from bench.fixed_rate import FixedRateResult, fixed_rate_load
from bench.flow import FlowTarget, fair_share, put_limit, wake_latency
from bench.growth import Filler
from bench.live import live_rounds
from bench.loadgen import LoadResult, http_load, post_json, wrk_available, wrk_load
from bench.processes import (
    BIN,
    RESULTS,
    ROOT,
    git_commit,
    machine,
    procfile_commands,
    servers,
    start,
    stop,
    wait_http,
    wait_log,
    wait_worker_ready,
)
from bench.stats import interleaved, paired_spread, spread
from bench.tracing import tracing_rounds
from conveyor.auth.keys import Principal, create_api_key
from conveyor.auth.roles import Role
from conveyor.broker.inspect import queue_depth, queue_lists
from conveyor.broker.internals import UNACKED_INDEX_KEY, UNACKED_KEY
from conveyor.cli import create_tenant
from conveyor.db import create_db_engine, create_session_factory
from conveyor.settings import Settings
from devtools.embedded import create_database, free_port

API_WORKERS = "2"  # the Procfile's default, for both stacks
WORKER_CONCURRENCY = "2"
CONNECTIONS = 32
WARMUP_SECONDS = 1.0  # of the same load before each measured HTTP phase
E2E_WARMUP = 64  # jobs end to end before each measured end to end
DRAIN_WARMUP = 50  # first jobs of a drain, not timed
WORKER_STEPS = (1, 2, 4)  # worker pool processes of the growth curve's drains
NOOP = {"type": "system.noop", "payload": {}}
BARE_SCHEMA = """
CREATE TABLE IF NOT EXISTS bare_jobs (
    id bigserial PRIMARY KEY,
    state text NOT NULL DEFAULT 'queued',
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
)
"""


def log(message: str) -> None:
    """Say what the benchmark is doing, on stderr, with a timestamp."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Stack:
    """One system under test: how to start its api and worker, and how to talk to it."""

    name: str
    env: dict[str, str]
    api_cmd: list[str]
    worker_cmd: list[str]
    port: int
    submit_path: str
    batch_path: str
    poll_prefix: str
    headers: dict[str, str]
    queue: str
    job_body: dict[str, Any]
    noop_task: str
    # Conveyor's beat (its dispatcher hands out the jobs that wait in the ledger); the
    # baseline has none. Started for the drain and kept for the phases after it.
    beat_cmd: list[str] | None = None
    # Conveyor's jobs wait in the ledger, not only in the broker: the drain counts them there.
    ledger: Ledger | None = None
    # The table the stack records its jobs in, read for end-to-end completions.
    done: Ledger | None = None
    # Which measures run on this stack: a baseline on a second server runs the HTTP ones.
    drains: bool = True
    e2e: bool = True
    batches: bool = True
    fixed: bool = True
    tenant_id: uuid.UUID | None = None
    api: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    beat: subprocess.Popen[bytes] | None = None
    peak_rss: dict[str, float] = field(default_factory=lambda: {"api": 0.0, "worker": 0.0})
    # While set, peaks go under "<phase>_api" and "<phase>_worker" instead: the import's
    # memory is measured apart, and the baseline, which has no import, is compared without it.
    phase: str | None = None


@dataclass
class Ledger:
    """Conveyor's job ledger, as the benchmark reads it."""

    engine: Engine
    table: str = "jobs"

    def unfinished(self) -> int:
        """Return how many jobs are queued or running (a small partial index: cheap)."""
        states = "('queued', 'running')" if self.table == "jobs" else "('queued')"
        with self.engine.connect() as conn:
            query = text(f"SELECT count(*) FROM {self.table} WHERE state IN {states}")  # noqa: S608
            return int(conn.execute(query).scalar_one())

    def forget_jobs(self) -> None:
        """Drop every job (the HTTP phases leave thousands queued that no worker ran)."""
        with self.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {self.table} CASCADE"))

    def succeeded(self, ids: list[str]) -> tuple[int, float | None]:
        """Return how many of `ids` succeeded, and the last one's finish (epoch seconds)."""
        kind = "uuid" if self.table == "jobs" else "bigint"
        query = text(
            f"SELECT count(*), extract(epoch FROM max(finished_at)) FROM {self.table} "  # noqa: S608
            f"WHERE id = ANY(CAST(:ids AS {kind}[])) AND state = 'succeeded'"
        )
        with self.engine.connect() as conn:
            count, last = conn.execute(query, {"ids": ids}).one()
        return int(count), None if last is None else float(last)


class RssSampler:
    """Sample the resident memory of a stack's api and worker processes in the background."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._stacks: list[Stack] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def watch(self, stacks: list[Stack]) -> None:
        """Sample these stacks' processes from now on."""
        self._stacks = list(stacks)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            for stack, role, proc in [
                (s, role, p)
                for s in self._stacks
                for role, p in (("api", s.api), ("worker", s.worker))
            ]:
                if proc is None or proc.poll() is not None:
                    continue
                name = role if stack.phase is None else f"{stack.phase}_{role}"
                with contextlib.suppress(psutil.Error):
                    parent = psutil.Process(proc.pid)
                    for p in [parent, *parent.children(recursive=True)]:
                        rss = p.memory_info().rss / 2**20
                        stack.peak_rss[name] = max(stack.peak_rss.get(name, 0.0), rss)

    def close(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


def load(stack: Stack, method: str, paths: list[str], body: Any, seconds: float) -> LoadResult:
    """Run the HTTP load generator (wrk when installed) against `stack` for `seconds`."""
    headers = dict(stack.headers)
    if body is not None:
        headers["Content-Type"] = "application/json"
    raw = None if body is None else json.dumps(body)
    run = wrk_load if wrk_available() else http_load
    return run(stack.port, method, paths, raw, headers, CONNECTIONS, seconds)


def drain_queue(r: redis.Redis, queue: str) -> None:
    """Empty a queue (all its priority lists) and kombu's unacked set."""
    r.delete(*queue_lists(queue), UNACKED_KEY, UNACKED_INDEX_KEY)


def worker_command(stack: Stack, concurrency: int | None) -> list[str]:
    """Return the stack's worker command, with `concurrency` pool processes if given."""
    if concurrency is None:
        return stack.worker_cmd
    return [
        f"--concurrency={concurrency}" if arg.startswith("--concurrency=") else arg
        for arg in stack.worker_cmd
    ]


def measure_drain(
    stack: Stack,
    r: redis.Redis,
    n: int,
    timeout: float,
    meter: CpuMeter | None = None,
    concurrency: int | None = None,
    keep_worker: bool = False,
) -> tuple[float, dict[str, float]]:
    """Time a freshly started worker running `n` waiting jobs; return per second and CPU/job.

    The first DRAIN_WARMUP jobs are the warm-up (the pool's first imports, connections and
    queries) and are not timed; the clock and the CPU meter start when they are done.
    """

    def in_broker() -> int:
        return queue_depth(r, stack.queue) + int(r.hlen(UNACKED_KEY))

    remaining = stack.ledger.unfinished if stack.ledger else in_broker
    # A SQL count is dearer than an LLEN: look less often, still at 1% of a 2 s drain.
    interval = 0.02 if stack.ledger else 0.005
    warm = min(DRAIN_WARMUP, n // 10)
    pending = remaining()
    start_t = None
    snapshot: dict[str, dict[int, float]] = {}
    deadline = time.monotonic() + timeout
    logfile = Path(stack.env["BENCH_LOGS"]) / f"{stack.name}-worker.log"
    stack.worker = start(worker_command(stack, concurrency), stack.env, logfile)
    try:
        while time.monotonic() < deadline:
            left = remaining()
            now = time.monotonic()
            if start_t is None and left <= pending - warm:
                start_t, pending = now, left
                snapshot = meter.snapshot() if meter else {}
            if left == 0 and start_t is not None:
                cpu = CpuMeter.per_op(snapshot, meter.snapshot(), pending) if meter else {}
                return pending / max(now - start_t, 1e-6), cpu
            time.sleep(interval)
        raise RuntimeError(f"{stack.name} drain did not finish in {timeout}s")
    finally:
        if not keep_worker:
            stop(stack.worker)
            stack.worker = None


def prequeue_noops(stack: Stack, n: int) -> None:
    """Put `n` no-op messages on the stack's queue, without a worker consuming them."""
    if stack.name == "conveyor":
        # Real jobs: ledger rows, published by the API's batch endpoint.
        for _ in range(n // 1000):
            post_json(stack.port, stack.batch_path, {"jobs": [NOOP] * 1000}, stack.headers)
        return
    from bench.bare_worker import app as bare_celery

    with bare_celery.producer_or_acquire() as producer:
        for _ in range(n):
            bare_celery.send_task(stack.noop_task, queue=stack.queue, producer=producer)


def submit_many(stack: Stack, jobs: int) -> list[str]:
    """Submit `jobs` single jobs over HTTP from 32 keep-alive threads; return their ids."""
    ids: list[str] = []
    lock = threading.Lock()
    per_thread = max(1, jobs // CONNECTIONS)

    def submitter() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        mine = []
        body = json.dumps(stack.job_body)
        headers = {**stack.headers, "Content-Type": "application/json"}
        for _ in range(per_thread):
            conn.request("POST", stack.submit_path, body, headers)
            response = conn.getresponse()
            data = response.read()
            if response.status >= 300:
                raise RuntimeError(f"submit failed: {response.status} {data[:200]!r}")
            mine.append(str(json.loads(data)["id"]))
        conn.close()
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=submitter) for _ in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids


def end_to_end(stack: Stack, jobs: int, timeout: float) -> float:
    """Submit `jobs` over HTTP from 32 threads and poll until all are visible as succeeded."""
    deadline = time.monotonic() + timeout
    began = time.monotonic()
    ids = submit_many(stack, jobs)
    pending = list(ids)
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    while pending and time.monotonic() < deadline:
        still = []
        for job_id in pending:
            conn.request("GET", stack.poll_prefix + job_id, headers=stack.headers)
            response = conn.getresponse()
            if json.loads(response.read()).get("state") != "succeeded":
                still.append(job_id)
        pending = still
        if pending:
            time.sleep(0.05)
    conn.close()
    if pending:
        raise RuntimeError(f"{stack.name}: {len(pending)} jobs not succeeded in {timeout}s")
    return len(ids) / (time.monotonic() - began)


def end_to_end_ledger(
    stack: Stack, jobs: int, timeout: float, meter: CpuMeter | None = None
) -> tuple[float, dict[str, float]]:
    """Submit `jobs` over HTTP; return jobs/s until the ledger's last finish, and CPU per job.

    Completion is read from the stack's own table (Conveyor: `jobs.state`/`finished_at`;
    baseline: `bare_jobs`), not by polling the API, so the reading costs neither stack.
    """
    assert stack.done is not None
    before = meter.snapshot() if meter else {}
    began = time.time()
    ids = submit_many(stack, jobs)
    deadline = time.monotonic() + timeout
    # Every unfinished job is one of ours (the table was emptied before the warm-up ran):
    # count those, a small index, rather than look up every id each time.
    while time.monotonic() < deadline:
        if stack.done.unfinished() == 0:
            count, last = stack.done.succeeded(ids)
            if count != len(ids) or last is None:
                raise RuntimeError(f"{stack.name}: {count} of {len(ids)} jobs succeeded")
            cpu = CpuMeter.per_op(before, meter.snapshot(), len(ids)) if meter else {}
            return len(ids) / max(last - began, 1e-6), cpu
        time.sleep(0.1)
    raise RuntimeError(f"{stack.name}: not all {len(ids)} jobs succeeded in {timeout}s")


def import_csv(stack: Stack, count: int, timeout: float) -> dict[str, float]:
    """Upload a `count`-row orders CSV over HTTP and import it with `orders.import_csv`.

    Returns rows per second and the api and worker processes' peak RSS during the phase
    (the issue's memory targets hold while a 1,000,000-row file goes through).
    """
    boundary = f"conveyor-bench-{time.time_ns()}"
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="orders.csv"\r\nContent-Type: text/csv\r\n\r\n'.encode(),
            *orders_csv.rows(count),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    stack.phase = "import"
    began = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=timeout)
        try:
            headers = {**stack.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}
            conn.request("POST", "/v1/uploads", body, headers)
            response = conn.getresponse()
            answer = response.read()
            if response.status != 201:
                raise RuntimeError(f"upload: {response.status} {answer[:300]!r}")
        finally:
            conn.close()
        del body
        upload_id = json.loads(answer)["id"]
        job = {"type": "orders.import_csv", "payload": {"upload_id": upload_id}}
        job_id = post_json(stack.port, stack.submit_path, job, stack.headers)["id"]
        view = _until(stack, f"{stack.poll_prefix}{job_id}", timeout, ("succeeded", "failed"))
        if view["state"] != "succeeded" or view["result"]["imported"] != count:
            raise RuntimeError(f"the import ended {view['state']}: {view.get('result')}")
        seconds = time.monotonic() - began
        time.sleep(0.5)  # one more RSS sample after the end
    finally:
        stack.phase = None
    # The same file as a workflow (chunks in parallel, then a summary), into an empty table.
    cleaner = create_engine(
        Settings(database_url=stack.env["CONVEYOR_DATABASE_URL"]).sqlalchemy_url
    )
    with cleaner.begin() as conn:
        conn.execute(text("DELETE FROM orders"))
    cleaner.dispose()
    began = time.monotonic()
    split = {
        "type": "orders.import_csv_parallel",
        "payload": {"upload_id": upload_id, "chunks": int(WORKER_CONCURRENCY)},
    }
    job_id = post_json(stack.port, stack.submit_path, split, stack.headers)["id"]
    view = _until(stack, f"{stack.poll_prefix}{job_id}", timeout, ("succeeded", "failed"))
    flow = _until(stack, f"/v1/workflows/{view['workflow_id']}", timeout, ("succeeded", "failed"))
    summary = next(job for job in flow["jobs"] if job["ref"] == "summary")
    if flow["state"] != "succeeded" or summary["result"]["imported"] != count:
        raise RuntimeError(f"the parallel import ended {flow['state']}: {summary.get('result')}")
    parallel = time.monotonic() - began
    return {
        "import_rows_per_s": count / seconds,
        "import_parallel_rows_per_s": count / parallel,
        "import_api_rss_mb": stack.peak_rss.get("import_api", 0.0),
        "import_worker_rss_mb": stack.peak_rss.get("import_worker", 0.0),
    }


def _until(stack: Stack, path: str, timeout: float, states: tuple[str, ...]) -> Any:
    """Poll a job or workflow until its state is one of `states`; return its view."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        try:
            conn.request("GET", path, headers=stack.headers)
            view = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        if view["state"] in states:
            return view
        time.sleep(0.2)
    raise RuntimeError(f"{path} did not finish in {timeout}s")


def fan_in(stack: Stack, parents: int, timeout: float) -> dict[str, float]:
    """Run a workflow of `parents` no-ops and one job after them all; return its jobs/s.

    Each parent's finish counts the fan-in down in one statement; were it to rescan the
    fan-in's edges, the last parents would cost `parents` times the first.
    """
    jobs = [{"ref": f"p{n}", "type": "system.noop"} for n in range(parents)]
    jobs.append({"ref": "fan-in", "type": "system.noop", "depends_on": [j["ref"] for j in jobs]})
    began = time.monotonic()
    flow = post_json(stack.port, "/v1/workflows", {"name": "fan-in", "jobs": jobs}, stack.headers)
    done = _until(stack, f"/v1/workflows/{flow['id']}", timeout, ("succeeded", "failed"))
    seconds = time.monotonic() - began
    if done["state"] != "succeeded":
        raise RuntimeError(f"the fan-in workflow ended {done['state']}")
    last = max(j["finished_at"] for j in done["jobs"] if j["ref"] != "fan-in")
    (started,) = [j["started_at"] for j in done["jobs"] if j["ref"] == "fan-in"]
    release = datetime.fromisoformat(started) - datetime.fromisoformat(last)
    return {
        "fan_in_jobs_per_s": (parents + 1) / seconds,
        "fan_in_release_ms": release.total_seconds() * 1000,
    }


def admin_key(settings: Settings, tenant_id: str) -> str:
    """Issue an admin API key in the tenant, straight in the database.

    Signing in would hash a password in the api, and its memory would show in the peak RSS.
    """
    engine = create_db_engine(settings)
    try:
        with create_session_factory(engine).begin() as session:
            _, token = create_api_key(
                session,
                settings.secret_key.get_secret_value(),
                Principal(tenant_id=uuid.UUID(tenant_id), role=Role.ADMIN),
                name="bench admin",
                role=Role.ADMIN,
                expires_at=None,
                now=datetime.now(UTC),
            )
    finally:
        engine.dispose()
    return token


def start_beat(stack: Stack) -> None:
    """Start the stack's beat, if it has one, on an empty ledger; return once it dispatches."""
    if stack.beat_cmd is None:
        return
    if stack.ledger is not None:
        stack.ledger.forget_jobs()
    logfile = Path(stack.env["BENCH_LOGS"]) / f"{stack.name}-beat.log"
    stack.beat = start(stack.beat_cmd, stack.env, logfile)
    wait_log(logfile, b"this beat leads dispatch")


def flow_rounds(
    stack: Stack, target: FlowTarget, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Measure flow control: limited against plain end to end, wake-up, fair shares."""
    out: dict[str, list[float]] = {}
    log(f"flow control: {args.rounds} x {args.e2e} plain and limited jobs, wake-up, fair shares")
    put_limit(target, "bench", {"max_running": 100_000})  # high enough never to bind
    limited = dataclasses.replace(stack, job_body={**stack.job_body, "limit_key": "bench"})
    for _ in range(args.rounds):
        plain = end_to_end(stack, args.e2e, 180)
        bound = end_to_end(limited, args.e2e, 180)
        out.setdefault("flow_plain_jobs_per_s", []).append(plain)
        out.setdefault("flow_limited_jobs_per_s", []).append(bound)
        out.setdefault("flow_limited_ratio", []).append(bound / plain)
        for key, value in {**wake_latency(target), **fair_share(target)}.items():
            out.setdefault(key, []).append(value)
    return out


def stack_meter(stack: Stack, pg_pid: int | None, redis_pid: int | None) -> CpuMeter:
    """Return a CPU meter over the stack's process groups and the shared servers."""

    def alive(proc: subprocess.Popen[bytes] | None) -> int | None:
        return proc.pid if proc is not None and proc.poll() is None else None

    def pool() -> list[tuple[int, bool]]:
        pid = alive(stack.worker)
        if pid is None:
            return []
        with contextlib.suppress(psutil.Error):
            return [(c.pid, True) for c in psutil.Process(pid).children()]
        return []

    def one(proc: subprocess.Popen[bytes] | None, children: bool) -> list[tuple[int, bool]]:
        pid = alive(proc)
        return [] if pid is None else [(pid, children)]

    return CpuMeter(
        {
            "api": lambda: one(stack.api, True),
            "worker_parent": lambda: one(stack.worker, False),
            "worker_children": pool,
            "beat": lambda: one(stack.beat, True),
            "postgres": lambda: [] if pg_pid is None else [(pg_pid, True)],
            "redis": lambda: [] if redis_pid is None else [(redis_pid, False)],
        }
    )


class Recorder:
    """Per-stack lists of per-round figures: `out[stack][key]` grows by one each round."""

    def __init__(self, names: list[str]) -> None:
        self.out: dict[str, dict[str, list[float]]] = {name: {} for name in names}

    def add(self, stack: Stack, key: str, value: float) -> None:
        """Append one round's figure."""
        self.out[stack.name].setdefault(key, []).append(value)

    def load(self, stack: Stack, prefix: str, res: LoadResult) -> None:
        """Record a load round's rate, latencies and errors."""
        if res.errors:
            log(f"  {stack.name} {prefix}: {res.errors} errors (non-2xx or failed requests)")
        for suffix, value in (
            ("rps", res.rps),
            ("p50_ms", res.p50_ms),
            ("p99_ms", res.p99_ms),
            ("errors", res.errors),
        ):
            self.add(stack, f"{prefix}_{suffix}", value)

    def cpu(self, stack: Stack, phase: str, per_op: dict[str, float]) -> None:
        """Record a phase's CPU milliseconds per operation, per process group."""
        for group, ms in per_op.items():
            self.add(stack, f"cpu_{phase}_{group}", ms)


def metered_load(
    stack: Stack, meter: CpuMeter, method: str, paths: list[str], body: Any, seconds: float
) -> tuple[LoadResult, dict[str, float]]:
    """Run one HTTP load round; return it and the CPU milliseconds per request per group."""
    before = meter.snapshot()
    res = load(stack, method, paths, body, seconds)
    return res, CpuMeter.per_op(before, meter.snapshot(), res.requests)


def fixed_rate(stack: Stack, rate: float, seconds: float) -> FixedRateResult:
    """Submit single jobs at `rate` per second, open loop, for `seconds`."""
    headers = {**stack.headers, "Content-Type": "application/json"}
    body = json.dumps(stack.job_body)
    return fixed_rate_load(stack.port, "POST", stack.submit_path, body, headers, rate, seconds)


def poll_targets(stack: Stack, n: int = 500) -> list[str]:
    """Create `n` jobs to poll (no worker runs them); return their paths."""
    batch = {"jobs": [stack.job_body] * n}
    items = post_json(stack.port, stack.batch_path, batch, stack.headers)["items"]
    return [stack.poll_prefix + str(item["id"]) for item in items]


def forget(stack: Stack, r: redis.Redis) -> None:
    """Drop the stack's leftover jobs: its ledger rows and its broker queue."""
    drain_queue(r, stack.queue)
    if stack.done is not None:
        stack.done.forget_jobs()


def start_worker(stack: Stack, concurrency: int | None = None) -> None:
    """Start the stack's worker and wait until Celery says it is ready."""
    wlog = Path(stack.env["BENCH_LOGS"]) / f"{stack.name}-worker.log"
    offset = wlog.stat().st_size if wlog.exists() else 0
    stack.worker = start(worker_command(stack, concurrency), stack.env, wlog)
    wait_worker_ready(wlog, offset)


def one_round(
    order: list[Stack],
    r: redis.Redis,
    args: argparse.Namespace,
    rec: Recorder,
    meters: dict[str, CpuMeter],
    worker_round: bool = True,
) -> None:
    """Run every measure once per stack, in `order`, each after its own warm-up."""
    paths = {}
    for stack in order:
        paths[stack.name] = poll_targets(stack)
    log("  submit, poll, fixed rate, batch")
    for stack in order:
        load(stack, "POST", [stack.submit_path], stack.job_body, WARMUP_SECONDS)
        res, cpu = metered_load(
            stack, meters[stack.name], "POST", [stack.submit_path], stack.job_body, args.seconds
        )
        rec.load(stack, "submit", res)
        rec.cpu(stack, "submit", cpu)
    for stack in order:
        load(stack, "GET", paths[stack.name], None, WARMUP_SECONDS)
        res, cpu = metered_load(
            stack, meters[stack.name], "GET", paths[stack.name], None, args.seconds
        )
        rec.load(stack, "poll", res)
        rec.cpu(stack, "poll", cpu)
    for rate in args.rate:
        # The first rate is the seed's 500/s; the others (e.g. one below saturation) get
        # the rate in their keys.
        prefix = "fixed" if rate == args.rate[0] else f"fixed{rate:g}"
        for stack in [s for s in order if s.fixed]:
            fixed_rate(stack, rate, WARMUP_SECONDS)
            before = meters[stack.name].snapshot()
            fixed = fixed_rate(stack, rate, args.seconds)
            after = meters[stack.name].snapshot()
            rec.add(stack, f"{prefix}_achieved_rps", fixed.achieved_rps)
            rec.add(stack, f"{prefix}_p50_ms", fixed.p50_ms)
            rec.add(stack, f"{prefix}_p99_ms", fixed.p99_ms)
            rec.add(stack, f"{prefix}_errors", fixed.errors)
            if fixed.errors:
                log(f"  {stack.name} {prefix}: {fixed.errors} errors of {fixed.sent} requests")
            rec.cpu(stack, prefix, CpuMeter.per_op(before, after, fixed.completed))
    for stack in [s for s in order if s.batches]:
        batch_rate(stack, 2, args.batch_size)
        before = meters[stack.name].snapshot()
        rate = batch_rate(stack, args.batches, args.batch_size)
        rec.add(stack, "batch_jobs_per_s", rate)
        jobs = args.batches * args.batch_size
        rec.cpu(stack, "batch", CpuMeter.per_op(before, meters[stack.name].snapshot(), jobs))
    for stack in order:
        forget(stack, r)
    if not worker_round:
        return
    log("  drain, end to end")
    for stack in order:
        if not (stack.drains or stack.e2e):
            continue
        if stack.drains:
            prequeue_noops(stack, args.drain)
            rate, cpu = measure_drain(
                stack, r, args.drain, 180, meters[stack.name], keep_worker=stack.e2e
            )
            rec.add(stack, "drain_per_s", rate)
            rec.cpu(stack, "drain", cpu)
        if stack.e2e:
            if stack.worker is None:
                start_worker(stack)
            end_to_end_ledger(stack, E2E_WARMUP, 60)
            rate, cpu = end_to_end_ledger(stack, args.e2e, 300, meters[stack.name])
            rec.add(stack, "e2e_jobs_per_s", rate)
            rec.cpu(stack, "e2e", cpu)
        stop(stack.worker)
        stack.worker = None
        forget(stack, r)


def _rounds(
    stacks: list[Stack],
    r: redis.Redis,
    args: argparse.Namespace,
    rec: Recorder,
    meters: dict[str, CpuMeter],
) -> None:
    """Run the rounds, the stacks' order reversed every other round."""
    for n in range(args.rounds):
        order = [
            next(s for s in stacks if s.name == name)
            for name in interleaved([s.name for s in stacks], n)
        ]
        log(f"round {n + 1}/{args.rounds}: {', '.join(s.name for s in order)}")
        one_round(order, r, args, rec, meters, n < args.worker_rounds)


def run_stacks(
    stacks: list[Stack],
    r: redis.Redis,
    args: argparse.Namespace,
    rss: RssSampler,
    flow: FlowTarget | None = None,
    servers_pids: tuple[int | None, int | None] = (None, None),
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Run the rounds (stack order alternating), then the growth curves and the extras."""
    rec = Recorder([s.name for s in stacks])
    out = rec.out
    growth: dict[str, Any] = {}
    meters = {s.name: stack_meter(s, *servers_pids) for s in stacks}
    rss.watch(stacks)
    try:
        for stack in stacks:
            logs = Path(stack.env["BENCH_LOGS"])
            stack.api = start(stack.api_cmd, stack.env, logs / f"{stack.name}-api.log")
        for stack in stacks:
            wait_http(stack.port)
            post_json(stack.port, stack.submit_path, stack.job_body, stack.headers)
        if args.tracing_only:
            _tracing_phase(stacks, r, args, out)
            return out, growth
        for stack in stacks:
            # As deployed, the beat runs all along (its dispatcher publishes what the API
            # leaves to it, e.g. most of a batch); it starts on an empty ledger.
            start_beat(stack)
        if not args.only_growth:
            try:
                _rounds(stacks, r, args, rec, meters)
            except KeyboardInterrupt:
                growth["interrupted"] = True
                log("rounds interrupted: writing the rounds measured so far")
                return out, growth
        if not args.skip_growth:
            try:
                growth_curves(stacks, r, args, meters, out, growth)
            except KeyboardInterrupt:
                # A time limit (SIGTERM) during the curves: keep the rounds and the points
                # measured so far, and say the curves are incomplete.
                growth["interrupted"] = True
                log("growth curves interrupted: writing what was measured")
        _extras(stacks, r, args, out, flow)
    finally:
        for stack in stacks:
            stop(stack.beat)
            stop(stack.worker)
            stop(stack.api)
            stack.beat = stack.worker = stack.api = None
        rss.watch([])
    for stack in stacks:
        for role in ("api", "worker"):
            if stack.peak_rss.get(role):  # the sync baseline runs no worker of its own
                out[stack.name][f"{role}_rss_mb"] = [stack.peak_rss[role]]
    return out, growth


def _extras(
    stacks: list[Stack],
    r: redis.Redis,
    args: argparse.Namespace,
    out: dict[str, dict[str, list[float]]],
    flow: FlowTarget | None,
) -> None:
    """The Conveyor-only measures, each opt-in: live status, flow, fan-in, import, tracing."""
    conveyor = next((s for s in stacks if s.name == "conveyor"), None)
    if conveyor is None:
        return
    if args.live and conveyor.ledger is not None:
        forget(conveyor, r)
        paths = poll_targets(conveyor)
        log(f"live status: {args.rounds} x submit and poll without/with 1,000 streams")
        out[conveyor.name].update(
            live_rounds(
                conveyor.port,
                conveyor.headers,
                conveyor.ledger.engine,
                r,
                args.rounds,
                submit=functools.partial(
                    load, conveyor, "POST", [conveyor.submit_path], conveyor.job_body, args.seconds
                ),
                poll=functools.partial(load, conveyor, "GET", paths, None, args.seconds),
                log=log,
                api_pid=conveyor.api.pid if conveyor.api else 0,
            )
        )
    if not (flow or args.fan_in or args.import_rows or args.tracing):
        return
    forget(conveyor, r)
    start_worker(conveyor)
    if flow is not None:
        out[conveyor.name].update(flow_rounds(conveyor, flow, args))
    if args.fan_in:
        log(f"workflow fan-in, {args.fan_in} parents, {args.rounds} rounds")
        for _ in range(args.rounds):
            for key, value in fan_in(conveyor, args.fan_in, 300).items():
                out[conveyor.name].setdefault(key, []).append(value)
    if args.import_rows:
        log(f"CSV import, {args.import_rows:,} rows, once")
        for key, value in import_csv(conveyor, args.import_rows, 900).items():
            out[conveyor.name][key] = [value]
    if args.tracing:
        _tracing_phase(stacks, r, args, out)


def growth_curves(
    stacks: list[Stack],
    r: redis.Redis,
    args: argparse.Namespace,
    meters: dict[str, CpuMeter],
    rounds: dict[str, dict[str, list[float]]],
    result: dict[str, Any],
) -> None:
    """Measure how costs grow: with worker processes, with jobs per run, with ledger rows.

    Fills `result` as it goes, so an interrupted run keeps the points already measured.
    The ledger's curve goes first: it takes the most setting up, and is emptied after.
    """
    drainers = [s for s in stacks if s.drains]
    result.update(drain_by_workers={}, e2e_large={}, ledger=[])
    conveyor = next((s for s in stacks if s.name == "conveyor"), None)
    if conveyor is not None and conveyor.ledger is not None and conveyor.tenant_id is not None:
        ledger_curve(conveyor, r, args, meters["conveyor"], result)
    log(f"growth: drain with {WORKER_STEPS} worker processes")
    for n, concurrency in enumerate(WORKER_STEPS):
        for stack in [drainers[i] for i in interleaved(range(len(drainers)), n)]:
            figures = result["drain_by_workers"].setdefault(stack.name, {})
            done = rounds.get(stack.name, {})
            if str(concurrency) == WORKER_CONCURRENCY and done.get("drain_per_s"):
                # The rounds measured this very drain five times: their median, not a sixth.
                figures[concurrency] = {
                    "jobs_per_s": statistics.median(done["drain_per_s"]),
                    "cpu_ms_per_job": {
                        g: statistics.median(done[f"cpu_drain_{g}"]) for g in (*GROUPS, "total")
                    },
                    "from_rounds": True,
                }
                continue
            forget(stack, r)
            prequeue_noops(stack, args.drain)
            rate, cpu = measure_drain(stack, r, args.drain, 180, meters[stack.name], concurrency)
            figures[concurrency] = {"jobs_per_s": rate, "cpu_ms_per_job": cpu}
    if args.growth_e2e:
        # Conveyor's cost per job with 10,000 in flight; the baseline's on request (it
        # takes a minute or two more).
        large = [s for s in stacks if s.e2e and (s.name == "conveyor" or args.growth_bare)]
        log(f"growth: end to end at {args.growth_e2e:,} jobs: {', '.join(s.name for s in large)}")
        for stack in large:
            forget(stack, r)
            start_worker(stack)
            try:
                rate, cpu = end_to_end_ledger(stack, args.growth_e2e, 900, meters[stack.name])
            finally:
                stop(stack.worker)
                stack.worker = None
            done = rounds.get(stack.name, {}).get("e2e_jobs_per_s")
            result["e2e_large"][stack.name] = {
                "jobs": args.growth_e2e,
                "jobs_per_s": rate,
                "cpu_ms_per_job": cpu,
                # The rounds' end to end, for the curve's first point.
                "rounds_jobs": args.e2e,
                "rounds_jobs_per_s": statistics.median(done) if done else None,
            }
            log(f"growth: {stack.name} end to end {rate:.0f} jobs/s")
            forget(stack, r)


def ledger_curve(
    conveyor: Stack,
    r: redis.Redis,
    args: argparse.Namespace,
    meter: CpuMeter,
    result: dict[str, Any],
) -> None:
    """Measure submit, poll and drain on an empty, a filled and a half-pruned ledger."""
    assert conveyor.ledger is not None
    assert conveyor.tenant_id is not None
    filler = Filler(conveyor.ledger.engine, conveyor.tenant_id, conveyor.queue)
    steps: list[tuple[str, int | None]] = [("empty", 0)]
    steps += [(f"{rows:,} finished", rows) for rows in args.growth_rows]
    steps.append(("pruned by half", None))
    for label, rows in steps:
        if rows is None:
            deleted, took = filler.prune_half()
            log(f"growth: pruned {deleted:,} jobs in {took:.0f}s")
        elif rows:
            took = filler.fill_to(rows)
            log(f"growth: ledger filled to {rows:,} finished jobs in {took:.0f}s")
        result["ledger"].append(ledger_point(conveyor, r, args, meter, label, filler))
    filler.forget_new()
    conveyor.ledger.forget_jobs()


def ledger_point(
    stack: Stack,
    r: redis.Redis,
    args: argparse.Namespace,
    meter: CpuMeter,
    label: str,
    filler: Filler,
) -> dict[str, Any]:
    """Measure submit, poll and drain on the ledger as it is now."""
    filler.forget_new()
    drain_queue(r, stack.queue)
    point: dict[str, Any] = {"label": label, "rows": filler.count()}
    paths = poll_targets(stack)
    load(stack, "POST", [stack.submit_path], stack.job_body, WARMUP_SECONDS)
    res, cpu = metered_load(stack, meter, "POST", [stack.submit_path], stack.job_body, args.seconds)
    point.update(submit_rps=res.rps, submit_p99_ms=res.p99_ms, submit_cpu_ms=cpu)
    load(stack, "GET", paths, None, WARMUP_SECONDS)
    res, cpu = metered_load(stack, meter, "GET", paths, None, args.seconds)
    point.update(poll_rps=res.rps, poll_p99_ms=res.p99_ms, poll_cpu_ms=cpu)
    filler.forget_new()
    drain_queue(r, stack.queue)
    prequeue_noops(stack, args.drain)
    rate, cpu = measure_drain(stack, r, args.drain, 180, meter)
    point.update(drain_per_s=rate, drain_cpu_ms=cpu)
    log(
        f"growth: {label}: submit {point['submit_rps']:.0f}/s, poll {point['poll_rps']:.0f}/s,"
        f" drain {rate:.0f}/s"
    )
    return point


def batch_rate(stack: Stack, batches: int, size: int = 1000) -> float:
    """Post `batches` batches of `size` jobs from 4 threads; return jobs accepted per second."""
    body = {"jobs": [stack.job_body] * size}
    todo = list(range(batches))
    lock = threading.Lock()

    def poster() -> None:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            post_json(stack.port, stack.batch_path, body, stack.headers)

    began = time.monotonic()
    threads = [threading.Thread(target=poster) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return batches * size / (time.monotonic() - began)


def _tracing_phase(
    stacks: list[Stack], r: redis.Redis, args: argparse.Namespace, out: dict[str, Any]
) -> None:
    """Measure Conveyor's submit and end to end with tracing on against off (bench/tracing.py)."""
    for stack in stacks:
        if stack.name != "conveyor":
            continue
        if stack.beat is None:  # --tracing-only: the dispatcher hands out jobs the gate held
            start_beat(stack)
        log(f"tracing on/off: {args.rounds} x {args.seconds}s submit, {args.e2e} jobs e2e each")
        measures = {"load": load, "end_to_end": end_to_end, "drain_queue": drain_queue}
        rounds, sample = tracing_rounds(stack, r, args, measures)
        out[stack.name].update(rounds)
        log(f"sample trace, as exported over OTLP/HTTP:\n{sample}")


# Lower is better for these; ratios are still Conveyor / baseline.
REPORT = [
    ("submit_rps", "single submit req/s (32 conn)", ">= 1.5x"),
    ("submit_p50_ms", "single submit p50 ms (32 conn)", ""),
    ("submit_p99_ms", "single submit p99 ms (32 conn)", ""),
    ("fixed_achieved_rps", "submit at a fixed 500/s: achieved req/s", ">= 500/s"),
    ("fixed_p50_ms", "submit at a fixed 500/s: p50 ms", ""),
    ("fixed_p99_ms", "submit at a fixed 500/s: p99 ms", "< 200 ms"),
    ("poll_rps", "status poll req/s (32 conn)", ">= 2x"),
    ("poll_p50_ms", "status poll p50 ms", ""),
    ("poll_p99_ms", "status poll p99 ms", ""),
    ("e2e_jobs_per_s", "end to end jobs/s (ledger)", ">= 1.5x"),
    ("drain_per_s", "worker drain jobs/s", ">= 1.0x"),
    ("batch_jobs_per_s", "batch submit jobs/s", ">= 20,000/s"),
    ("api_rss_mb", "peak RSS api process MB", "<= 150 MB"),
    ("worker_rss_mb", "peak RSS worker process MB", "<= 200 MB"),
    ("import_rows_per_s", "CSV import rows/s (Conveyor only)", ""),
    ("import_parallel_rows_per_s", "CSV import as a workflow rows/s (chunks in parallel)", ""),
    ("fan_in_jobs_per_s", "workflow: 999 no-ops + 1 fan-in, jobs/s end to end", ""),
    ("fan_in_release_ms", "workflow: last parent's finish to fan-in start ms", ""),
    ("import_api_rss_mb", "peak RSS api MB, CSV upload", "<= 150 MB"),
    ("import_worker_rss_mb", "peak RSS worker MB, CSV import", "<= 200 MB"),
    ("flow_plain_jobs_per_s", "flow: plain jobs end to end/s (Conveyor only)", ""),
    ("flow_limited_jobs_per_s", "flow: jobs with a limit key end to end/s", ""),
    ("flow_limited_ratio", "flow: limited / plain (limit not binding)", ">= 0.8"),
    ("wake_p50_ms", "flow: freed slot to next start p50 ms", ""),
    ("wake_p95_ms", "flow: freed slot to next start p95 ms", "~100 ms"),
    ("fair_p50_ms", "flow: B's wait to start p50 ms (A: 10,000 queued)", ""),
    ("fair_p95_ms", "flow: B's wait to start p95 ms (A: 10,000 queued)", "<= 2,000 ms"),
    ("tracing_off_submit_rps", "tracing off: single submit req/s (Conveyor only)", ""),
    ("tracing_on_submit_rps", "tracing on: single submit req/s", ""),
    ("tracing_off_submit_p50_ms", "tracing off: single submit p50 ms", ""),
    ("tracing_on_submit_p50_ms", "tracing on: single submit p50 ms", ""),
    ("tracing_submit_rps_ratio", "tracing: submit on / off", ""),
    ("tracing_off_e2e_jobs_per_s", "tracing off: end to end jobs/s", ""),
    ("tracing_on_e2e_jobs_per_s", "tracing on: end to end jobs/s", ""),
    ("tracing_e2e_jobs_per_s_ratio", "tracing: end to end on / off", ""),
    ("tracing_otlp_requests", "tracing: OTLP/HTTP export requests", ""),
    ("live_submit_ratio", "live: submit req/s with / without 1,000 streams", ">= 0.9"),
    ("live_poll_ratio", "live: poll req/s with / without 1,000 streams", ">= 0.9"),
    ("live_submit_rps_with", "live: submit req/s, 1,000 streams open", ""),
    ("live_poll_rps_with", "live: poll req/s, 1,000 streams open", ""),
    ("live_submit_cpu_ms_with", "live: API CPU ms per submit, 1,000 streams open", ""),
    ("live_submit_cpu_ms_before", "live: API CPU ms per submit, no streams", ""),
    ("live_poll_cpu_ms_with", "live: API CPU ms per poll, 1,000 streams open", ""),
    ("live_poll_cpu_ms_before", "live: API CPU ms per poll, no streams", ""),
    ("live_idle_cpu_percent_with", "live: API CPU % with 1,000 idle streams", ""),
    ("live_transition_p50_ms", "live: commit to stream frame p50 ms", ""),
    ("live_transition_p99_ms", "live: commit to stream frame p99 ms", "<= 50 ms"),
]
# The phases whose CPU per operation is reported, and what an operation is in each.
CPU_PHASES = [
    ("submit", "single submit (32 conn), per request"),
    ("fixed", "submit at the first fixed rate, per request"),
    ("poll", "status poll, per request"),
    ("batch", "batch submit, per job"),
    ("drain", "worker drain, per job"),
    ("e2e", "end to end, per job"),
]
# The baseline on the same server as Conveyor (gevent) is "bare": every ratio in the
# summary is like for like. The baseline on gunicorn's sync workers, as earlier runs
# measured it, is "bare-sync".
BASELINES = ("bare", "bare-sync")


def _extra_rates(results: dict[str, dict[str, list[float]]]) -> list[tuple[str, str, str]]:
    """Return report rows for the fixed rates after the first (`--rate 500,200`)."""
    rows = []
    for key in results.get("conveyor", {}):
        found = re.fullmatch(r"fixed([\d.]+)_achieved_rps", key)
        if found:
            rate = found.group(1)
            rows += [
                (f"fixed{rate}_achieved_rps", f"submit at a fixed {rate}/s: achieved req/s", ""),
                (f"fixed{rate}_p50_ms", f"submit at a fixed {rate}/s: p50 ms", ""),
                (f"fixed{rate}_p99_ms", f"submit at a fixed {rate}/s: p99 ms", ""),
            ]
    return rows


def summarise(results: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Reduce rounds to medians with their spread, and paired per-round ratios."""
    rows = []
    for key, label, target in REPORT + _extra_rates(results):
        mine = results.get("conveyor", {}).get(key)
        if not mine:
            continue  # a phase that did not run (an opt-in, or the other stack only)
        row: dict[str, Any] = {"key": key, "label": label, "target": target}
        row["conveyor"] = statistics.median(mine)
        row["conveyor_spread"] = spread(mine).as_dict()
        for name, prefix in zip(BASELINES, ("bare", "bare_sync"), strict=True):
            theirs = results.get(name, {}).get(key)
            ratio = paired_spread(mine, theirs) if theirs else None
            row[prefix] = statistics.median(theirs) if theirs else None
            row[f"{prefix}_spread"] = spread(theirs).as_dict() if theirs else None
            # The median of the round-by-round ratios, not the ratio of the medians.
            row["ratio" if prefix == "bare" else "ratio_sync"] = ratio.median if ratio else None
            row["ratio_spread" if prefix == "bare" else "ratio_sync_spread"] = (
                ratio.as_dict() if ratio else None
            )
        rows.append(row)
    return rows


def cpu_summary(results: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Return the median CPU milliseconds per operation, per phase, stack and process group."""
    rows = []
    found = (re.match(r"cpu_fixed([\d.]+)_total$", k) for f in results.values() for k in f)
    rates = sorted({m.group(1) for m in found if m})
    phases = CPU_PHASES + [(f"fixed{r}", f"submit at a fixed {r}/s, per request") for r in rates]
    for phase, label in phases:
        for stack, figures in results.items():
            if f"cpu_{phase}_total" not in figures:
                continue
            groups = {g: statistics.median(figures[f"cpu_{phase}_{g}"]) for g in (*GROUPS, "total")}
            rows.append({"phase": phase, "label": label, "stack": stack, "cpu_ms": groups})
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _ratio(row: dict[str, Any], key: str) -> str:
    found = row.get(f"{key}_spread")
    if not found:
        return ""
    return f"{found['median']:.2f}x ({found['low']:.2f}-{found['high']:.2f})"


def table(rows: list[dict[str, Any]]) -> str:
    """Render the summary as a Markdown table."""
    lines = [
        "| measure (median of rounds) | Conveyor | bare (gevent) | Conveyor/bare, paired "
        "(min-max) | bare (sync) | Conveyor/bare (sync), paired | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        digits = 2 if row["key"].endswith("_ratio") else 1
        lines.append(
            f"| {row['label']} | {_fmt(row['conveyor'], digits)} | {_fmt(row['bare'])} "
            f"| {_ratio(row, 'ratio')} | {_fmt(row['bare_sync'])} | {_ratio(row, 'ratio_sync')} "
            f"| {row['target']} |"
        )
    return "\n".join(lines)


def cpu_table(rows: list[dict[str, Any]]) -> str:
    """Render CPU milliseconds per operation as a Markdown table."""
    names = " | ".join(g.replace("_", " ") for g in GROUPS)
    lines = [
        f"| CPU ms per operation (median) | stack | {names} | total |",
        "| --- | --- |" + " ---: |" * (len(GROUPS) + 1),
    ]
    for row in rows:
        cells = " | ".join(f"{row['cpu_ms'][g]:.2f}" for g in (*GROUPS, "total"))
        lines.append(f"| {row['label']} | {row['stack']} | {cells} |")
    return "\n".join(lines)


def growth_table(growth: dict[str, Any]) -> str:
    """Render the growth curves' figures as Markdown tables."""
    lines = ["(interrupted: the curves are incomplete)", ""] if growth.get("interrupted") else []
    if growth.get("ledger"):
        lines += [
            "| Conveyor's ledger | rows | submit req/s | CPU ms/submit | poll req/s "
            "| CPU ms/poll | drain jobs/s | CPU ms/job drained |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in growth["ledger"]:
            lines.append(
                f"| {p['label']} | {p['rows']:,} | {p['submit_rps']:.0f} "
                f"| {p['submit_cpu_ms']['total']:.2f} | {p['poll_rps']:.0f} "
                f"| {p['poll_cpu_ms']['total']:.2f} | {p['drain_per_s']:.0f} "
                f"| {p['drain_cpu_ms']['total']:.2f} |"
            )
        lines.append("")
    by_workers = growth.get("drain_by_workers") or {}
    if by_workers:
        names = list(by_workers)
        lines += [
            "| worker processes | " + " | ".join(f"{n} drain jobs/s" for n in names) + " |",
            "| ---: |" + " ---: |" * len(names),
        ]
        for procs in sorted({p for figures in by_workers.values() for p in figures}):
            cells = " | ".join(
                _fmt(by_workers[n].get(procs, {}).get("jobs_per_s"), 0) for n in names
            )
            lines.append(f"| {procs} | {cells} |")
        lines.append("")
    for name, e2e in (growth.get("e2e_large") or {}).items():
        lines.append(
            f"- end to end, {e2e['jobs']:,} jobs, {name}: {e2e['jobs_per_s']:.0f} jobs/s, "
            f"{e2e['cpu_ms_per_job']['total']:.2f} ms CPU per job"
        )
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], growth: dict[str, Any], path: Path, title: str) -> None:
    """Draw Conveyor against the baselines, one panel per measure, then the growth curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(growth)
    bar_lines = -(-len(rows) // 7)
    lines = bar_lines + (1 if curves else 0)
    fig, axes = plt.subplots(lines, 7, figsize=(21, 3.25 * lines), squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        bars = [("Conveyor", row["conveyor"]), ("bare", row["bare"]), ("sync", row["bare_sync"])]
        bars = [(name, value) for name, value in bars if value is not None]
        drawn = ax.bar(
            [n for n, _ in bars],
            [v for _, v in bars],
            color=["#2b6cb0", "#a0aec0", "#cbd5e0"][: len(bars)],
        )
        # Each round's figure as a dot: the spread is part of the result.
        for n, (name, _) in enumerate(bars):
            key = {"Conveyor": "conveyor", "bare": "bare", "sync": "bare_sync"}[name]
            found = row.get(f"{key}_spread") or {}
            if found.get("n", 0) > 1:
                ax.vlines(n, found["low"], found["high"], color="black", linewidth=1)
        ax.bar_label(drawn, fmt="%.0f" if row["conveyor"] > 20 else "%.1f", fontsize=8)
        ratio = "" if row["ratio"] is None else f"\n{_ratio(row, 'ratio')}"
        ax.set_title(f"{row['label']}{ratio}", fontsize=8)
        ax.tick_params(labelsize=8)
    used = len(rows)
    for ax in list(axes.flat)[used : bar_lines * 7]:
        ax.axis("off")
    if curves:
        row_axes = list(axes[bar_lines])
        for ax, (name, draw) in zip(row_axes, curves, strict=False):
            draw(ax)
            ax.set_title(name, fontsize=8)
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=7)
        for ax in row_axes[len(curves) :]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _curves(growth: dict[str, Any]) -> list[tuple[str, Any]]:
    """Return the growth panels to draw, as (title, draw(ax)) pairs."""
    curves: list[tuple[str, Any]] = []
    points = growth.get("ledger") or []
    if points:
        labels = [
            f"{p['rows'] / 1e6:g}M" + ("\nafter prune" if p["label"].startswith("pruned") else "")
            for p in points
        ]

        def rates(ax: Any) -> None:
            for key, name in (
                ("submit_rps", "submit"),
                ("poll_rps", "poll"),
                ("drain_per_s", "drain"),
            ):
                ax.plot(labels, [p[key] for p in points], marker="o", label=name)
            ax.set_ylim(bottom=0)

        def cpu(ax: Any) -> None:
            for key, name in (
                ("submit_cpu_ms", "submit"),
                ("poll_cpu_ms", "poll"),
                ("drain_cpu_ms", "drain (per job)"),
            ):
                ax.plot(labels, [p[key]["total"] for p in points], marker="o", label=name)
            ax.set_ylim(bottom=0)

        curves += [("Conveyor per second vs ledger rows", rates)]
        curves += [("Conveyor CPU ms per op vs ledger rows", cpu)]
    by_workers = growth.get("drain_by_workers") or {}
    if by_workers:

        def workers(ax: Any) -> None:
            for name, figures in by_workers.items():
                procs = sorted(figures)
                ax.plot(procs, [figures[p]["jobs_per_s"] for p in procs], marker="o", label=name)
            ax.set_xticks(sorted({p for f in by_workers.values() for p in f}))
            ax.set_ylim(bottom=0)

        curves.append(("drain jobs/s vs worker processes", workers))
    large = growth.get("e2e_large") or {}
    if large:

        def e2e(ax: Any) -> None:
            for name, figures in large.items():
                sizes = [figures["rounds_jobs"], figures["jobs"]]
                rates = [figures.get("rounds_jobs_per_s"), figures["jobs_per_s"]]
                if rates[0] is None:
                    sizes, rates = sizes[1:], rates[1:]
                ax.plot(sizes, rates, marker="o", label=name)
            ticks = {f[k] for f in large.values() for k in ("rounds_jobs", "jobs")}
            ax.set_xticks(sorted(ticks))
            ax.set_ylim(bottom=0)

        curves.append(("end to end jobs/s vs jobs per run", e2e))
    return curves


def _rates(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v.strip() and float(v) > 0]


def _rows(value: str) -> list[int]:
    return [int(v.replace("_", "")) for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the benchmark's flags (`make bench BENCH_ARGS="..."`)."""
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per HTTP load round")
    parser.add_argument(
        "--rate",
        type=_rates,
        default=[500.0],
        help="fixed submit rates per second, e.g. 500,200 (0 skips)",
    )
    parser.add_argument("--batches", type=int, default=20, help="batches per round")
    parser.add_argument("--batch-size", type=int, default=500, help="jobs per batch")
    parser.add_argument("--drain", type=int, default=1000, help="no-op jobs per drain")
    parser.add_argument("--e2e", type=int, default=1200, help="jobs per end-to-end round")
    parser.add_argument(
        "--worker-rounds",
        type=int,
        default=3,
        help="rounds (the first N) that also run the drain and the end to end",
    )
    parser.add_argument("--only", choices=["conveyor", "bare"], help="skip the other stack")
    parser.add_argument(
        "--no-sync-baseline", action="store_true", help="skip the baseline on sync workers"
    )
    parser.add_argument("--skip-growth", action="store_true", help="skip the growth curves")
    parser.add_argument(
        "--only-growth", action="store_true", help="run the growth curves and not the rounds"
    )
    parser.add_argument(
        "--growth-rows",
        type=_rows,
        default=[1_000_000, 5_000_000],
        help="ledger sizes in finished jobs, e.g. 1000000,5000000",
    )
    parser.add_argument(
        "--growth-e2e", type=int, default=10_000, help="jobs of the large end to end (0 skips)"
    )
    parser.add_argument(
        "--growth-bare", action="store_true", help="the large end to end on the baseline too"
    )
    # Opt-in measures (Conveyor only); together they take longer than the rest.
    parser.add_argument("--import-rows", type=int, default=0, help="rows of the CSV import")
    parser.add_argument("--flow", action="store_true", help="measure flow control")
    parser.add_argument("--fan-in", type=int, default=0, help="parents of the fan-in workflow")
    parser.add_argument("--tracing", action="store_true", help="measure tracing on vs off")
    parser.add_argument(
        "--tracing-only",
        action="store_true",
        help="measure only Conveyor's submit and e2e with tracing on vs off; print, save nothing",
    )
    parser.add_argument("--live", action="store_true", help="measure 1,000 open streams")
    parser.add_argument("--name", help="results file name in bench/results (default: the date)")
    args = parser.parse_args(argv)
    if args.tracing_only:
        args.only = "conveyor"
    args.drain = max(1000, args.drain // 1000 * 1000)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark and write its results."""
    args = parse_args(argv)
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    interrupted = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        # Once: a second signal (a time limit signals the whole process group) must not
        # interrupt the clean-up or the writing of what was measured.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        interrupted.set()
        raise KeyboardInterrupt(signum)

    signal.signal(signal.SIGTERM, on_signal)
    rss = RssSampler()
    try:
        with servers(root) as (pg_url, redis_url):
            return _bench(args, root, pg_url, redis_url, rss, began)
    finally:
        rss.close()
        shutil.rmtree(root, ignore_errors=True)


def _port(url: str) -> int | None:
    return urlsplit(url).port


def member_tenant(settings: Settings, name: str) -> dict[str, Any]:
    """Create a tenant with a `member` API key (as `conveyor create-tenant` does); return it."""
    return create_tenant(
        settings,
        name=name,
        email=f"{name.lower()}-{os.getpid()}-{time.time_ns()}@conveyor.local",
        password=None,
        key_role=Role.MEMBER,
    )


def _bench(
    args: argparse.Namespace,
    root: Path,
    pg_url: str,
    redis_url: str,
    rss: RssSampler,
    began: float,
) -> int:
    conveyor_db = create_database(pg_url, "conveyor_bench")
    bare_db = create_database(pg_url, "bare_bench")
    logs = root / "logs"
    logs.mkdir()
    env = {
        # Tracing is off but in its own phase (bench/tracing.py), whatever this shell has set.
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "CONVEYOR_DATABASE_URL": conveyor_db,
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_SECRET_KEY": secrets.token_urlsafe(32),
        "CONVEYOR_DATA_DIR": str(root),
        "CONVEYOR_LOG_LEVEL": "INFO",
        "BARE_DATABASE_URL": bare_db,
        # The import phase's file (~59 MB for 1,000,000 rows) is above the 50 MB default.
        "CONVEYOR_MAX_UPLOAD_BYTES": str(256 * 1024 * 1024),
        "BENCH_LOGS": str(logs),
    }
    os.environ.update(
        {k: env[k] for k in ("BARE_DATABASE_URL", "CONVEYOR_REDIS_URL", "CONVEYOR_SECRET_KEY")}
    )
    log(f"migrating; servers {pg_url.split('?')[0]} and {redis_url}")
    subprocess.run(
        [BIN / "conveyor", "migrate"],
        env=env,
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    bare_engine = create_engine(Settings(database_url=bare_db).sqlalchemy_url, pool_size=2)
    with bare_engine.begin() as conn:
        conn.execute(text(BARE_SCHEMA))
        conn.execute(text("TRUNCATE bare_jobs"))
    settings = Settings(database_url=conveyor_db, redis_url=redis_url)
    tenant = member_tenant(settings, "Bench")
    key = tenant["api_key"]
    # The flow measures' other tenant: its backlog shares the queue with the bench tenant's.
    backlog_key = member_tenant(settings, "Backlog")["api_key"]
    engine = create_engine(settings.sqlalchemy_url, pool_size=2)
    r = redis.Redis.from_url(redis_url)
    stacks = []
    if args.only in (None, "conveyor"):
        stacks.append(conveyor_stack(env, root, settings, key, tenant["tenant_id"], engine))
    if args.only in (None, "bare"):
        stacks.append(bare_stack(env, "bare", bare_engine, gevent=True))
        if not args.no_sync_baseline:
            stacks.append(bare_stack(env, "bare-sync", bare_engine, gevent=False))
    flow = None
    if args.only in (None, "conveyor") and args.flow:
        flow = FlowTarget(
            port=stacks[0].port,
            headers=stacks[0].headers,
            backlog={"Authorization": f"Bearer {backlog_key}"},
            engine=engine,
            admin={"Authorization": f"Bearer {admin_key(settings, tenant['tenant_id'])}"},
        )
    pids = (_server_pid(pg_url, root / "pgdata"), _server_pid(redis_url))
    try:
        results, growth = run_stacks(stacks, r, args, rss, flow, pids)
        for stack in stacks:
            drain_queue(r, stack.queue)
    except BaseException:
        log(f"failed; logs kept in {logs}")
        keep = Path(tempfile.mkdtemp(prefix="conveyor-bench-logs-"))
        shutil.copytree(logs, keep, dirs_exist_ok=True)
        raise
    finally:
        r.close()
        engine.dispose()
        bare_engine.dispose()
    rows = summarise(results) if "conveyor" in results else []
    cpu = cpu_summary(results)
    if args.tracing_only:
        print(table(rows))
        return 0
    stamp = datetime.now(UTC)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # `<date>.json` is the name make soak takes its rate from.
    base = RESULTS / (args.name or stamp.strftime("%Y-%m-%d"))
    record = {
        "date": stamp.isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine(),
        "settings": {
            "api_workers": API_WORKERS,
            "worker_concurrency": WORKER_CONCURRENCY,
            "connections": CONNECTIONS,
            "servers_measured_for_cpu": {"postgres_pid": pids[0], "redis_pid": pids[1]},
            **vars(args),
        },
        "summary": rows,
        "cpu_ms_per_op": cpu,
        "growth": growth,
        "rounds": results,
        "duration_s": round(time.monotonic() - began, 1),
    }
    base.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    if rows:
        chart(
            rows,
            growth,
            base.with_suffix(".png"),
            f"Conveyor vs bare Flask + Celery, {stamp:%Y-%m-%d} ({record['machine']['cpus']} "
            f"CPUs, {args.rounds} rounds; bars: medians, lines: min-max)",
        )
    print(table(rows))
    print()
    print(cpu_table(cpu))
    print()
    print(growth_table(growth))
    log(f"wrote {base}.json and .png in {record['duration_s']}s")
    return 0


def _server_pid(url: str, pgdata: Path | None = None) -> int | None:
    """Return the pid of the server behind `url` (for its CPU time), when it can be found.

    The embedded PostgreSQL listens on a socket only: its postmaster.pid names it. A given
    server is found by its TCP port; it may serve others too, whose CPU then counts here.
    """
    pidfile = pgdata / "postmaster.pid" if pgdata else None
    if pidfile is not None and pidfile.exists():
        return int(pidfile.read_text().split()[0])
    port = _port(url)
    return listening_pid(port) if port else None


def conveyor_stack(
    env: dict[str, str],
    root: Path,
    settings: Settings,
    key: str,
    tenant_id: str,
    engine: Engine,
) -> Stack:
    """Return Conveyor as deployed: the Procfile's web, worker and beat, in production mode."""
    port = free_port()
    env = {
        **env,
        # As `make soak` runs it (bench/soak.py): production settings and a Flower password.
        "CONVEYOR_ENV": "production",
        "CONVEYOR_FLOWER_PASSWORD": secrets.token_urlsafe(16),
        "PROMETHEUS_MULTIPROC_DIR": str(root / "prom"),
        "CONVEYOR_API_BIND": f"127.0.0.1:{port}",
        "CONVEYOR_API_WORKERS": API_WORKERS,
        "CONVEYOR_WORKER_CONCURRENCY": WORKER_CONCURRENCY,
    }
    commands = procfile_commands(env)
    return Stack(
        name="conveyor",
        env=env,
        port=port,
        api_cmd=commands["web"],
        worker_cmd=commands["worker"],
        beat_cmd=commands["beat"],
        submit_path="/v1/jobs",
        batch_path="/v1/jobs/batch",
        poll_prefix="/v1/jobs/",
        headers={"Authorization": f"Bearer {key}"},
        queue=settings.default_queue,
        job_body=NOOP,
        noop_task="system.noop",
        ledger=Ledger(engine),
        done=Ledger(engine),
        tenant_id=uuid.UUID(tenant_id),
    )


def bare_stack(env: dict[str, str], name: str, engine: Engine, *, gevent: bool) -> Stack:
    """Return the baseline: on gunicorn's gevent workers as Conveyor's are, or its sync ones."""
    port = free_port()
    server = ["--worker-class", "gevent", "--worker-connections", "2000", "--keep-alive", "5"]
    return Stack(
        name=name,
        env=env,
        port=port,
        api_cmd=[
            str(BIN / "gunicorn"),
            "--workers",
            API_WORKERS,
            "--access-logfile",
            "-",
            *(server if gevent else []),
            "--bind",
            f"127.0.0.1:{port}",
            "bench.bare_api:create_app()",
        ],
        worker_cmd=[
            str(BIN / "celery"),
            "-A",
            "bench.bare_worker",
            "worker",
            "--loglevel=INFO",
            f"--concurrency={WORKER_CONCURRENCY}",
            "-Q",
            "bare",
        ],
        submit_path="/jobs",
        batch_path="/jobs/batch",
        poll_prefix="/jobs/",
        headers={},
        queue="bare",
        job_body={"n": 1},
        noop_task="bare.noop",
        done=Ledger(engine, "bare_jobs"),
        # The worker does not depend on the API's server, nor do 20 batch requests: one
        # baseline runs those, the other only the closed-loop submit and poll (the
        # like-for-like fixed rate is the gevent baseline's).
        drains=gevent,
        e2e=gevent,
        batches=gevent,
        fixed=gevent,
    )


if __name__ == "__main__":
    sys.exit(main())
