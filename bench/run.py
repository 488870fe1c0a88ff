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

import psutil
import redis
from sqlalchemy import Engine, create_engine, text

from bench import orders_csv
from bench.flow import FlowTarget, fair_share, put_limit, wake_latency
from bench.live import live_rounds
from bench.loadgen import LoadResult, http_load, post_json, wrk_available, wrk_load
from bench.processes import (
    BIN,
    RESULTS,
    ROOT,
    git_commit,
    machine,
    servers,
    start,
    stop,
    wait_http,
    wait_log,
    wait_worker_ready,
)
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

    def unfinished(self) -> int:
        """Return how many jobs are queued or running."""
        with self.engine.connect() as conn:
            query = text("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
            return int(conn.execute(query).scalar_one())

    def forget_jobs(self) -> None:
        """Drop every job (the HTTP phases leave thousands queued that no worker ran)."""
        with self.engine.begin() as conn:
            conn.execute(text("TRUNCATE jobs CASCADE"))


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


def measure_drain(stack: Stack, r: redis.Redis, n: int, timeout: float) -> float:
    """Time a freshly started worker running `n` waiting jobs; return per second."""

    def in_broker() -> int:
        return queue_depth(r, stack.queue) + int(r.hlen(UNACKED_KEY))

    remaining = stack.ledger.unfinished if stack.ledger else in_broker
    # A SQL count is dearer than an LLEN: look less often, still at 1% of a 2 s drain.
    interval = 0.02 if stack.ledger else 0.005
    pending = remaining()
    start_t = None
    deadline = time.monotonic() + timeout
    logfile = Path(stack.env["BENCH_LOGS"]) / f"{stack.name}-worker.log"
    stack.worker = start(stack.worker_cmd, stack.env, logfile)
    try:
        while time.monotonic() < deadline:
            left = remaining()
            now = time.monotonic()
            if start_t is None and left < pending:
                start_t = now
            if left == 0 and start_t is not None:
                return n / (now - start_t)
            time.sleep(interval)
        raise RuntimeError(f"{stack.name} drain did not finish in {timeout}s")
    finally:
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


def end_to_end(stack: Stack, jobs: int, timeout: float) -> float:
    """Submit `jobs` over HTTP from 32 threads and poll until all are visible as succeeded."""
    ids: list[str] = []
    lock = threading.Lock()
    per_thread = jobs // CONNECTIONS
    deadline = time.monotonic() + timeout

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

    began = time.monotonic()
    threads = [threading.Thread(target=submitter) for _ in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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


def run_stacks(
    stacks: list[Stack],
    r: redis.Redis,
    args: argparse.Namespace,
    rss: RssSampler,
    flow: FlowTarget | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Run every measure, alternating stacks round by round so machine noise hits both alike."""
    out: dict[str, dict[str, list[float]]] = {s.name: {} for s in stacks}

    def record(stack: Stack, prefix: str, res: LoadResult) -> None:
        mine = out[stack.name]
        mine.setdefault(f"{prefix}_rps", []).append(res.rps)
        mine.setdefault(f"{prefix}_p50_ms", []).append(res.p50_ms)
        mine.setdefault(f"{prefix}_p99_ms", []).append(res.p99_ms)
        mine.setdefault(f"{prefix}_errors", []).append(res.errors)

    rss.watch(stacks)
    try:
        for stack in stacks:
            logs = Path(stack.env["BENCH_LOGS"])
            stack.api = start(stack.api_cmd, stack.env, logs / f"{stack.name}-api.log")
        for stack in stacks:
            wait_http(stack.port)
            # Warm up every api worker process (imports, pools, first queries).
            post_json(stack.port, stack.submit_path, stack.job_body, stack.headers)
            load(stack, "POST", [stack.submit_path], stack.job_body, 1.0)
        if args.tracing_only:
            _tracing_phase(stacks, r, args, out)
            return out
        log(f"single submit, {args.rounds} x {args.seconds}s per stack")
        for _ in range(args.rounds):
            for stack in stacks:
                record(
                    stack,
                    "submit",
                    load(stack, "POST", [stack.submit_path], stack.job_body, args.seconds),
                )
        paths = {}
        for stack in stacks:
            batch = {"jobs": [stack.job_body] * 500}
            items = post_json(stack.port, stack.batch_path, batch, stack.headers)["items"]
            paths[stack.name] = [stack.poll_prefix + str(item["id"]) for item in items]
        log(f"status poll, {args.rounds} x {args.seconds}s per stack")
        for _ in range(args.rounds):
            for stack in stacks:
                record(stack, "poll", load(stack, "GET", paths[stack.name], None, args.seconds))
        for stack in stacks:
            if stack.name == "conveyor" and stack.ledger is not None and not args.no_live:
                log(f"live status: {args.rounds} x submit and poll without/with 1,000 streams")
                out[stack.name].update(
                    live_rounds(
                        stack.port,
                        stack.headers,
                        stack.ledger.engine,
                        r,
                        args.rounds,
                        submit=functools.partial(
                            load, stack, "POST", [stack.submit_path], stack.job_body, args.seconds
                        ),
                        poll=functools.partial(
                            load, stack, "GET", paths[stack.name], None, args.seconds
                        ),
                        log=log,
                        api_pid=stack.api.pid if stack.api else 0,
                    )
                )
        log(f"batch submit, {args.rounds} x {args.batches} batches of 1000 per stack")
        for _ in range(args.rounds):
            for stack in stacks:
                rate = batch_rate(stack, args.batches)
                out[stack.name].setdefault("batch_jobs_per_s", []).append(rate)
        for stack in stacks:
            drain_queue(r, stack.queue)
            start_beat(stack)
        log(f"worker drain, {args.rounds} x {args.drain} no-ops per stack")
        for _ in range(args.rounds):
            for stack in stacks:
                prequeue_noops(stack, args.drain)
                rate = measure_drain(stack, r, args.drain, 180)
                out[stack.name].setdefault("drain_per_s", []).append(rate)
        log(f"end to end, {args.rounds} x {args.e2e} jobs per stack")
        for stack in stacks:
            drain_queue(r, stack.queue)
            wlog = Path(stack.env["BENCH_LOGS"]) / f"{stack.name}-worker.log"
            offset = wlog.stat().st_size if wlog.exists() else 0
            stack.worker = start(stack.worker_cmd, stack.env, wlog)
            wait_worker_ready(wlog, offset)
        for _ in range(args.rounds):
            for stack in stacks:
                rate = end_to_end(stack, args.e2e, 180)
                out[stack.name].setdefault("e2e_jobs_per_s", []).append(rate)
        for stack in stacks:
            if stack.name == "conveyor" and flow is not None:
                out[stack.name].update(flow_rounds(stack, flow, args))
        for stack in stacks:
            if stack.name == "conveyor" and args.fan_in:
                log(f"workflow fan-in, {args.fan_in} parents, {args.rounds} rounds")
                for _ in range(args.rounds):
                    for key, value in fan_in(stack, args.fan_in, 300).items():
                        out[stack.name].setdefault(key, []).append(value)
            if stack.name == "conveyor" and args.import_rows:
                # Once: the baseline has no import, and one 1,000,000-row file takes a minute.
                log(f"CSV import, {args.import_rows:,} rows, once")
                for key, value in import_csv(stack, args.import_rows, 900).items():
                    out[stack.name][key] = [value]
        if not args.no_tracing:
            _tracing_phase(stacks, r, args, out)
    finally:
        for stack in stacks:
            stop(stack.beat)
            stop(stack.worker)
            stop(stack.api)
            stack.beat = stack.worker = stack.api = None
        rss.watch([])
    for stack in stacks:
        out[stack.name]["api_rss_mb"] = [stack.peak_rss["api"]]
        out[stack.name]["worker_rss_mb"] = [stack.peak_rss["worker"]]
    return out


def batch_rate(stack: Stack, batches: int) -> float:
    """Post `batches` batches of 1,000 jobs from 4 threads; return jobs accepted per second."""
    body = {"jobs": [stack.job_body] * 1000}
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
    return batches * 1000 / (time.monotonic() - began)


# Lower is better for these; ratios are still Conveyor / baseline.
REPORT = [
    ("submit_rps", "single submit req/s (32 conn)", ">= 1.0x"),
    ("submit_p50_ms", "single submit p50 ms", ""),
    ("submit_p99_ms", "single submit p99 ms", "<= 50 ms"),
    ("poll_rps", "status poll req/s (32 conn)", ">= 1.5x"),
    ("poll_p50_ms", "status poll p50 ms", ""),
    ("poll_p99_ms", "status poll p99 ms", ""),
    ("e2e_jobs_per_s", "end to end jobs/s", ">= 1.3x"),
    ("drain_per_s", "worker drain tasks/s", ">= 0.8x"),
    ("batch_jobs_per_s", "batch submit jobs/s", ">= 10,000/s"),
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


def summarise(results: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Reduce rounds to medians and Conveyor/baseline ratios."""
    rows = []
    for key, label, target in REPORT:
        if key not in results["conveyor"]:
            continue  # the import phase was skipped (--import-rows 0)
        conveyor = statistics.median(results["conveyor"][key])
        # Conveyor-only measures (the import, tracing) have no baseline.
        bare_results = results.get("bare", {})
        bare = statistics.median(bare_results[key]) if key in bare_results else None
        ratio = conveyor / bare if bare else None
        rows.append(
            {
                "key": key,
                "label": label,
                "conveyor": conveyor,
                "bare": bare,
                "ratio": ratio,
                "target": target,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Render the summary as a Markdown table."""
    lines = [
        "| measure (median) | Conveyor | bare | Conveyor/bare | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        bare = "" if row["bare"] is None else f"{row['bare']:,.1f}"
        digits = 2 if row["key"].endswith("_ratio") else 1
        value = f"{row['conveyor']:,.{digits}f}"
        lines.append(f"| {row['label']} | {value} | {bare} | {ratio} | {row['target']} |")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Draw Conveyor against the baseline, one panel per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = -(-len(rows) // 7)
    fig, axes = plt.subplots(lines, 7, figsize=(21, 3.25 * lines))
    for ax, row in zip(axes.flat, rows, strict=False):
        names, values = ["Conveyor", "bare"], [row["conveyor"], row["bare"]]
        if row["bare"] is None:
            names, values = names[:1], values[:1]
        bars = ax.bar(names, values, color=["#2b6cb0", "#a0aec0"][: len(names)])
        ax.bar_label(bars, fmt="%.0f" if row["conveyor"] > 20 else "%.1f", fontsize=8)
        ratio = "" if row["ratio"] is None else f"\n{row['ratio']:.2f}x"
        ax.set_title(f"{row['label']}{ratio}", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark and write its results."""
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per HTTP load round")
    parser.add_argument("--batches", type=int, default=4, help="batches of 1,000 per round")
    parser.add_argument("--drain", type=int, default=1000, help="no-op messages per round")
    parser.add_argument("--e2e", type=int, default=512, help="jobs per end-to-end round")
    parser.add_argument("--only", choices=["conveyor", "bare"], help="skip the other stack")
    parser.add_argument(
        "--import-rows", type=int, default=1_000_000, help="rows of the CSV import (0 skips it)"
    )
    parser.add_argument("--no-flow", action="store_true", help="skip the flow-control measures")
    parser.add_argument(
        "--fan-in", type=int, default=999, help="parents of the fan-in workflow (0 skips it)"
    )
    parser.add_argument(
        "--no-tracing", action="store_true", help="skip submit and e2e with tracing on vs off"
    )
    parser.add_argument(
        "--tracing-only",
        action="store_true",
        help="measure only Conveyor's submit and e2e with tracing on vs off; print, save nothing",
    )
    parser.add_argument("--no-live", action="store_true", help="skip the live-status measures")
    args = parser.parse_args(argv)
    if args.tracing_only:
        args.only = "conveyor"
    args.drain = max(1000, args.drain // 1000 * 1000)
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    interrupted = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
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
    bare_engine = create_engine(Settings(database_url=bare_db).sqlalchemy_url)
    with bare_engine.begin() as conn:
        conn.execute(text(BARE_SCHEMA))
        conn.execute(text("TRUNCATE bare_jobs"))
    bare_engine.dispose()
    settings = Settings(database_url=conveyor_db, redis_url=redis_url)
    tenant = create_tenant(
        settings,
        name="Bench",
        email=f"bench-{os.getpid()}-{time.time_ns()}@conveyor.local",
        password=None,
        key_role=Role.MEMBER,
    )
    key = tenant["api_key"]
    # The flow measures' other tenant: its backlog shares the queue with the bench tenant's.
    backlog_key = create_tenant(
        settings,
        name="Backlog",
        email=f"backlog-{os.getpid()}-{time.time_ns()}@conveyor.local",
        password=None,
        key_role=Role.MEMBER,
    )["api_key"]
    engine = create_engine(settings.sqlalchemy_url, pool_size=2)
    r = redis.Redis.from_url(redis_url)
    gunicorn = [str(BIN / "gunicorn"), "--workers", API_WORKERS, "--access-logfile", "-"]
    celery = [str(BIN / "celery")]
    stacks = []
    if args.only in (None, "conveyor"):
        port = free_port()
        stacks.append(
            Stack(
                name="conveyor",
                env=env,
                port=port,
                # As the Procfile runs it: gevent workers, keep-alive, multiprocess metrics.
                api_cmd=[
                    *gunicorn,
                    "--config",
                    "python:api.gunicorn_config",
                    "--bind",
                    f"127.0.0.1:{port}",
                    "api:create_app()",
                ],
                worker_cmd=[
                    *celery,
                    "-A",
                    "worker.main",
                    "worker",
                    "--loglevel=INFO",
                    f"--concurrency={WORKER_CONCURRENCY}",
                ],
                submit_path="/v1/jobs",
                batch_path="/v1/jobs/batch",
                poll_prefix="/v1/jobs/",
                headers={"Authorization": f"Bearer {key}"},
                queue=settings.default_queue,
                job_body=NOOP,
                noop_task="system.noop",
                beat_cmd=[
                    *celery,
                    "-A",
                    "worker.main",
                    "beat",
                    "--loglevel=INFO",
                    f"--schedule={root / 'beat-schedule'}",
                ],
                ledger=Ledger(engine),
            )
        )
    if args.only in (None, "bare"):
        port = free_port()
        stacks.append(
            Stack(
                name="bare",
                env=env,
                port=port,
                api_cmd=[*gunicorn, "--bind", f"127.0.0.1:{port}", "bench.bare_api:create_app()"],
                worker_cmd=[
                    *celery,
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
            )
        )
    flow = None
    if args.only in (None, "conveyor") and not args.no_flow:
        flow = FlowTarget(
            port=stacks[0].port,
            headers=stacks[0].headers,
            backlog={"Authorization": f"Bearer {backlog_key}"},
            engine=engine,
            admin={"Authorization": f"Bearer {admin_key(settings, tenant['tenant_id'])}"},
        )
    try:
        results = run_stacks(stacks, r, args, rss, flow)
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
    if args.tracing_only:
        print(table(summarise(results)))
        return 0
    if len(results) < 2:
        print(json.dumps(results, indent=2))
        return 0
    rows = summarise(results)
    stamp = datetime.now(UTC)
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / stamp.strftime("%Y-%m-%d")
    record = {
        "date": stamp.isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine(),
        "settings": {
            "api_workers": API_WORKERS,
            "worker_concurrency": WORKER_CONCURRENCY,
            "connections": CONNECTIONS,
            **vars(args),
        },
        "summary": rows,
        "rounds": results,
        "duration_s": round(time.monotonic() - began, 1),
    }
    base.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    chart(
        rows,
        base.with_suffix(".png"),
        f"Conveyor vs bare Flask + Celery, {stamp:%Y-%m-%d} ({record['machine']['cpus']} CPUs)",
    )
    print(table(rows))
    log(f"wrote {base}.json and .png in {record['duration_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
