"""`make soak`: Conveyor as deployed under steady load; nothing lost, nothing keeps growing.

Starts (or is given) PostgreSQL and Redis, runs the Procfile's `release`, `web`, `worker`
and `beat` commands with short retention (finished jobs pruned and result keys expired
after `--retention` seconds, so both cycle several times within the run), submits no-op
jobs at 80% of the benchmark's end-to-end rate and polls each one, then checks: no 5xx,
every accepted job `succeeded` in PostgreSQL, the RSS of every process flat after warm-up,
Redis memory and table sizes bounded. Writes `bench/results/soak-<date>.json` and `.png`,
prints a table, exits 1 if a check failed. Every process is stopped by pid, also on
Ctrl-C. Usage: `python -m bench.soak [--minutes 5] [--rate JOBS_PER_S]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

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
from bench.soak_checks import (
    LOAD_SHARE,
    RunFacts,
    bench_e2e_rate,
    evaluate,
    percentile,
    plan_windows,
    table,
)
from bench.soak_load import Ledger, Load, Sampler
from bench.soak_report import chart
from conveyor.auth.roles import Role
from conveyor.cli import create_tenant
from conveyor.settings import Settings
from devtools.embedded import create_database, free_port


def log(message: str) -> None:
    """Say what the soak is doing, on stderr, with a timestamp."""
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def soak_env(
    root: Path, database_url: str, redis_url: str, port: int, retention: int
) -> dict[str, str]:
    """Return the processes' environment: production settings, retention of `retention` s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        PROMETHEUS_MULTIPROC_DIR=str(root / "prom"),
        CONVEYOR_ENV="production",
        CONVEYOR_SECRET_KEY=secrets.token_urlsafe(32),
        CONVEYOR_FLOWER_PASSWORD=secrets.token_urlsafe(16),
        CONVEYOR_DATABASE_URL=database_url,
        CONVEYOR_REDIS_URL=redis_url,
        CONVEYOR_DATA_DIR=str(root / "data"),
        CONVEYOR_API_BIND=f"127.0.0.1:{port}",
        # Short retention, so pruning and expiry run many times within the soak.
        CONVEYOR_RESULT_EXPIRES=str(retention),
        CONVEYOR_JOB_RETENTION_DAYS=repr(retention / 86400),
        CONVEYOR_IDEMPOTENCY_RETENTION_HOURS=repr(retention / 3600),
        # One prune deletes at most 1,000 jobs: every 5 s keeps up with 200 jobs/s.
        CONVEYOR_PRUNE_INTERVAL="5",
    )
    # An operator's own settings (a rate limit's, say) still win over ours.
    env.update({k: v for k, v in os.environ.items() if k.startswith("CONVEYOR_")})
    return env


@contextlib.contextmanager
def conveyor(root: Path, env: dict[str, str], port: int) -> Iterator[dict[str, Any]]:
    """Run the Procfile's web, worker and beat; yield their Popens; stop them by pid."""
    commands = procfile_commands(env)
    logs = root / "logs"
    procs: dict[str, Any] = {}
    try:
        procs["api"] = start(commands["web"], env, logs / "web.log")
        wait_http(port)
        procs["worker"] = start(commands["worker"], env, logs / "worker.log")
        wait_worker_ready(logs / "worker.log", 0)
        procs["beat"] = start(commands["beat"], env, logs / "beat.log")
        # Housekeeping (the pruning among it) runs once beat holds the leader lock.
        wait_log(logs / "beat.log", b"this beat leads housekeeping")
        yield procs
    finally:
        for name in ("beat", "worker", "api"):
            stop(procs.get(name))


def choose_rate(args: argparse.Namespace, port: int, token: str) -> tuple[float, str]:
    """Return the target jobs/s and where it came from: --rate, a bench result, or a burst."""
    if args.rate:
        return args.rate, "--rate"
    found = bench_e2e_rate(RESULTS)
    if found:
        rate, name = found
        return LOAD_SHARE * rate, f"{LOAD_SHARE:.0%} of end-to-end {rate:.1f} jobs/s in {name}"
    from bench.run import Stack, end_to_end

    log("no benchmark result: measuring a short end-to-end burst (256 jobs)")
    stack = Stack(
        name="conveyor",
        env={},
        api_cmd=[],
        worker_cmd=[],
        port=port,
        submit_path="/v1/jobs",
        batch_path="/v1/jobs/batch",
        poll_prefix="/v1/jobs/",
        headers={"Authorization": f"Bearer {token}"},
        queue="default",
        job_body={"type": "system.noop", "payload": {}},
        noop_task="system.noop",
    )
    rate = end_to_end(stack, 256, 120)
    return LOAD_SHARE * rate, f"{LOAD_SHARE:.0%} of a measured burst of {rate:.1f} jobs/s"


def main(argv: list[str] | None = None) -> int:
    """Run the soak; return 0 when every check passed."""
    parser = argparse.ArgumentParser(prog="soak")
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the load")
    parser.add_argument("--rate", type=float, help="jobs/s (default: 80%% of the bench's e2e)")
    parser.add_argument("--retention", type=int, default=60, help="seconds (>= 60)")
    parser.add_argument("--warmup", type=float, help="seconds before the first window")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--drain", type=float, default=600.0, help="max seconds to settle")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed growth")
    args = parser.parse_args(argv)
    args.retention = max(60, args.retention)  # Settings refuse a shorter result expiry
    root = Path(tempfile.mkdtemp(prefix="conveyor-soak-"))
    for folder in ("logs", "data", "prom"):
        (root / folder).mkdir()

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signum)

    signal.signal(signal.SIGTERM, on_signal)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C must still stop us cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    failed = True
    try:
        with servers(root) as (pg_url, redis_url):
            failed = _soak(args, root, pg_url, redis_url)
            return 1 if failed else 0
    except KeyboardInterrupt:
        log("interrupted; every process was stopped")
        return 130
    finally:
        if failed:
            keep = Path(tempfile.mkdtemp(prefix="conveyor-soak-logs-"))
            shutil.copytree(root / "logs", keep, dirs_exist_ok=True)
            log(f"logs kept in {keep}")
        shutil.rmtree(root, ignore_errors=True)


def compress_autovacuum(admin_url: str) -> None:
    """Wake autovacuum every 10 s instead of 60 s on our own throwaway server.

    Retention is squeezed from days into a minute, so a minute of dead rows between two
    vacuums is as large as the live table; squeezing the nap keeps that ratio near a real
    deployment's, where a queue table's dead rows are a sliver of its retained ones.
    """
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET autovacuum_naptime = '10s'")
        conn.execute("SELECT pg_reload_conf()")


def _soak(args: argparse.Namespace, root: Path, pg_url: str, redis_url: str) -> bool:
    """Run the load against a fresh Conveyor; return whether any check failed."""
    if not os.environ.get("BENCH_DATABASE_URL"):
        compress_autovacuum(pg_url)
    database_url = create_database(pg_url, "conveyor_soak")
    port = free_port()
    env = soak_env(root, database_url, redis_url, port, args.retention)
    log(f"migrating; servers {pg_url.split('?')[0]} and {redis_url}")
    release = procfile_commands(env)["release"]
    done = subprocess.run(release, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(release)} failed:\n{done.stdout}{done.stderr}")
    settings = Settings(
        database_url=database_url, redis_url=redis_url, secret_key=env["CONVEYOR_SECRET_KEY"]
    )
    token = create_tenant(
        settings,
        name="Soak",
        email=f"soak-{os.getpid()}-{time.time_ns()}@conveyor.local",
        password=None,
        key_role=Role.MEMBER,
    )["api_key"]
    commit = git_commit()  # now: a commit made while the soak runs is not what it measured
    seconds = args.minutes * 60
    windows = plan_windows(seconds, args.retention, args.warmup)
    if windows.early[0] < args.retention + 30:
        log("too short for retention to cycle before the first window: storage checks may fail")
    with conveyor(root, env, port) as procs:
        rate, source = choose_rate(args, port, token)
        log(f"{rate:.1f} jobs/s ({source}) for {seconds:.0f} s; windows {asdict(windows)}")
        load = Load(port, token, rate, seconds)
        ledger = Ledger(database_url, load)
        ledger.start()
        began = time.monotonic()
        sampler = Sampler(
            procs,
            database_url,
            redis_url,
            args.sample,
            began,
            # Accepted, not yet settled in the ledger: grows when the worker falls behind.
            lambda: {"backlog": load.accepted_count() - ledger.settled()},
        )
        sampler.start(seconds)
        try:
            progress = threading.Thread(target=_report_progress, args=(load, ledger, seconds))
            progress.daemon = True
            progress.start()
            load.run()
            sampler.stop()
            # Bounded twice: by --drain, and by a minute in which no job settled.
            log(f"load done; settling {len(ledger.pending)} jobs (at most {args.drain:.0f} s)")
            ledger.wait_settled(args.drain)
        finally:
            load.finish()
            ledger.stop()
            sampler.stop()
        alive = {name: proc.poll() is None for name, proc in procs.items()}
    facts = RunFacts(
        rate=rate,
        seconds=seconds,
        submit_statuses=load.submits,
        poll_statuses=load.polls,
        accepted=len(load.accepted),
        succeeded=ledger.succeeded,
        alive=alive,
        tolerance=args.tolerance,
    )
    checks = evaluate(facts, sampler.samples, windows)
    stamp = datetime.now(UTC)
    accepted = len(load.accepted)
    record: dict[str, Any] = {
        "date": stamp.isoformat(timespec="seconds"),
        "git": commit,
        "machine": machine(),
        "settings": {**vars(args), "rate": rate, "rate_source": source},
        "windows": asdict(windows),
        "totals": {
            "submitted": sum(load.submits.values()),
            "accepted": accepted,
            "achieved_rate": accepted / seconds,
            "submit_statuses": {str(k): v for k, v in load.submits.items()},
            "poll_statuses": {str(k): v for k, v in load.polls.items()},
            "succeeded_in_ledger": ledger.succeeded,
            "other_terminal": dict(ledger.other),
            "missing": ledger.missing,
            "never_settled": len(ledger.pending),
            "ledger_latency_p50_s": percentile(ledger.durations, 0.5),
            "ledger_latency_p99_s": percentile(ledger.durations, 0.99),
            "seen_succeeded_p50_s": percentile(load.latencies, 0.5),
            "seen_succeeded_p99_s": percentile(load.latencies, 0.99),
        },
        "checks": [asdict(c) for c in checks],
        "samples": sampler.samples,
    }
    base = RESULTS / f"soak-{stamp:%Y-%m-%d}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    chart(sampler.samples, windows, base.with_suffix(".png"), _title(record))
    totals = record["totals"]
    print(
        f"Soak {seconds / 60:.0f} min at {rate:.1f} jobs/s target ({source}): "
        f"{accepted:,} accepted ({totals['achieved_rate']:.1f}/s), "
        f"{ledger.succeeded:,} succeeded in PostgreSQL; submit to finish p50 "
        f"{totals['ledger_latency_p50_s']:.2f} s, p99 {totals['ledger_latency_p99_s']:.2f} s; "
        f"seen succeeded over HTTP p50 {totals['seen_succeeded_p50_s']:.2f} s, "
        f"p99 {totals['seen_succeeded_p99_s']:.2f} s"
    )
    print(table(checks))
    log(f"wrote {base}.json and .png")
    return not all(c.ok for c in checks)


def _title(record: dict[str, Any]) -> str:
    settings = record["settings"]
    return (
        f"Conveyor soak {record['date'][:16]}: {settings['minutes']:g} min at "
        f"{settings['rate']:.1f} jobs/s, retention {settings['retention']} s "
        f"({record['machine']['cpus']} CPUs, git {record['git']})"
    )


def _report_progress(load: Load, ledger: Ledger, seconds: float) -> None:
    """Log a progress line every 30 s while the load runs (bounded by its length)."""
    for _ in range(int(seconds // 30)):
        time.sleep(30)
        log(
            f"accepted {load.accepted_count():,}, succeeded {ledger.succeeded:,}, "
            f"pending {len(ledger.pending):,}, submit statuses {dict(load.submits)}"
        )


if __name__ == "__main__":
    sys.exit(main())
