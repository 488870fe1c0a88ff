"""Flow control in `make bench` (Conveyor only): how long a freed slot stays empty, and fair shares.

Both read the ledger's own times: `created_at` (the submit), `started_at` (the claim) and
`finished_at` (the finish), written by the API and the worker on this one machine's clock.
The throughput of limited against plain jobs is an end-to-end round in `bench/run.py`.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, text

from bench.loadgen import post_json, request_json

WAKE_JOBS = 20
WAKE_SECONDS = 0.05
BACKLOG = 10_000
FAIR_JOBS = 100


@dataclass
class FlowTarget:
    """Where the flow measures send their requests and read their verdicts."""

    port: int
    # The bench tenant's API key (its jobs), another tenant's key (the backlog).
    headers: dict[str, str]
    backlog: dict[str, str]
    engine: Engine
    # An admin key of the bench tenant: a member key may not set limits.
    admin: dict[str, str]


def percentile(values: Sequence[float], q: float) -> float:
    """Return the `q`-th percentile (0-100) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def put_limit(target: FlowTarget, key: str, body: dict[str, Any]) -> None:
    """Set one of the bench tenant's limits."""
    request_json(target.port, "PUT", f"/v1/limits/{key}", body, target.admin)


def ledger_times(
    target: FlowTarget, ids: Sequence[str]
) -> list[tuple[str, datetime, datetime | None, datetime | None]]:
    """Return (state, created, started, finished) of each job, read from the ledger."""
    with target.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT state, created_at, started_at, finished_at FROM jobs "
                "WHERE id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": list(ids)},
        ).all()
    return [(row[0], row[1], row[2], row[3]) for row in rows]


def wait_succeeded(target: FlowTarget, ids: Sequence[str], timeout: float) -> None:
    """Wait (bounded) until every job succeeded, reading the ledger."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(state == "succeeded" for state, *_ in ledger_times(target, ids)):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{len(ids)} flow jobs did not all succeed within {timeout}s")


def wake_latency(target: FlowTarget) -> dict[str, float]:
    """Run jobs one at a time under a limit of one; return how long each freed slot stayed empty.

    The gap is from one job's finish to the next one's start: the finish commits, the
    ledger notifies the dispatcher, it publishes the next job, a worker claims it.
    """
    key = f"wake-{uuid.uuid4().hex[:6]}"
    put_limit(target, key, {"max_running": 1})
    job = {"type": "system.sleep", "payload": {"seconds": WAKE_SECONDS}, "limit_key": key}
    ids = [post_json(target.port, "/v1/jobs", job, target.headers)["id"] for _ in range(WAKE_JOBS)]
    wait_succeeded(target, ids, 120)
    runs = sorted((started, finished) for _, _, started, finished in ledger_times(target, ids))
    gaps = [
        (nxt[0] - prev[1]).total_seconds() * 1000
        for prev, nxt in itertools.pairwise(runs)
        if prev[1] is not None and nxt[0] is not None
    ]
    return {"wake_p50_ms": statistics.median(gaps), "wake_p95_ms": percentile(gaps, 95)}


def fair_share(target: FlowTarget) -> dict[str, float]:
    """Queue another tenant's 10,000 jobs, then submit 100; return their waits to start.

    The backlog goes in as batches of 1,000 (as fast as the API takes them); the 100 come
    as single submits from 4 threads right after. Each wait is its job's start minus its
    submit. The backlog left over is then deleted from the ledger so the next phase
    starts clean.
    """
    noop = {"type": "system.noop", "payload": {}}
    for _ in range(BACKLOG // 1000):
        post_json(target.port, "/v1/jobs/batch", {"jobs": [noop] * 1000}, target.backlog)
    ids: list[str] = []
    lock = threading.Lock()

    def submitter(count: int) -> None:
        mine = [
            post_json(target.port, "/v1/jobs", noop, target.headers)["id"] for _ in range(count)
        ]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=submitter, args=(FAIR_JOBS // 4,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_succeeded(target, ids, 300)
    waits = [
        (started - created).total_seconds() * 1000
        for _, created, started, _ in ledger_times(target, ids)
        if started is not None
    ]
    with target.engine.begin() as conn:
        left = conn.execute(
            text(
                "DELETE FROM jobs WHERE state = 'queued' AND tenant_id <> ("
                " SELECT tenant_id FROM jobs WHERE id = CAST(:one AS uuid))"
            ),
            {"one": ids[0]},
        ).rowcount
    return {
        "fair_p50_ms": statistics.median(waits),
        "fair_p95_ms": percentile(waits, 95),
        "fair_max_ms": max(waits),
        "fair_backlog_left": float(left),
    }
