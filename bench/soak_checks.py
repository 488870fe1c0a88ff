"""The soak's verdicts as pure functions of its samples: flat, bounded, nothing lost.

A series is a list of `(seconds since the load started, value)` samples. "Flat" compares
the median of the last window with the median of the window right after warm-up: a
median shrugs off the spikes a shared 2-core machine throws in, and a leak still shows
as a later median above the earlier one.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Point = tuple[float, float]
Series = Sequence[Point]
# The benchmark's result files are `<YYYY-MM-DD>.json`; the soak's own are `soak-<date>.json`.
BENCH_RESULT = re.compile(r"^\d{4}-\d{2}-\d{2}\.json$")
# Target load as a share of the benchmark's end-to-end rate (the 80%).
LOAD_SHARE = 0.8
# A table may grow by a few pages (32 of 8 kB) whatever its size: a B-tree splits a page.
TABLE_FLOOR_MB = 0.25


@dataclass(frozen=True)
class Windows:
    """The two spans of the load phase whose medians are compared, in seconds."""

    early: tuple[float, float]
    late: tuple[float, float]


@dataclass(frozen=True)
class RunFacts:
    """What the load and the ledger counted in one run."""

    rate: float
    seconds: float
    submit_statuses: Mapping[int, int]
    poll_statuses: Mapping[int, int]
    accepted: int
    succeeded: int
    alive: Mapping[str, bool]
    tolerance: float = 0.10


@dataclass(frozen=True)
class Check:
    """One pass/fail verdict with the figures behind it."""

    name: str
    ok: bool
    detail: str


def plan_windows(duration: float, retention: float, warmup: float | None = None) -> Windows:
    """Place a one-minute window after warm-up and one at the end (shorter in short runs)."""
    window = min(60.0, duration / 4)
    # Warm-up must outlast retention, or tables and Redis are still filling in the early window.
    wanted = retention + 30 if warmup is None else warmup
    start = max(0.0, min(wanted, duration - 2 * window))
    return Windows(early=(start, start + window), late=(duration - window, duration))


def window_median(series: Series, window: tuple[float, float]) -> float | None:
    """Return the median of the samples inside `window` (inclusive), or None if none are."""
    values = [v for t, v in series if window[0] <= t <= window[1]]
    return statistics.median(values) if values else None


def flat_check(
    name: str, series: Series, windows: Windows, *, tolerance: float, floor: float, unit: str
) -> Check:
    """Pass when the late median exceeds the early one by at most `tolerance` (or `floor`).

    Only growth fails: memory handed back is no leak. `floor` keeps series too small for a
    percentage to mean anything (a 200 kB table, a few hundred Redis keys) from failing on
    one page or one key.
    """
    early = window_median(series, windows.early)
    late = window_median(series, windows.late)
    if early is None or late is None:
        return Check(name, False, "no samples in a window (the process died or restarted?)")
    limit = max(early * (1 + tolerance), early + floor)
    change = f"{(late / early - 1) * 100:+.1f}%" if early else "n/a"
    detail = f"{early:,.1f} -> {late:,.1f} {unit} ({change}; limit {limit:,.1f})"
    return Check(name, late <= limit, detail)


def count_check(name: str, bad: int, total: int, what: str) -> Check:
    """Pass when nothing counted as bad happened."""
    return Check(name, bad == 0, f"{bad:,} {what} of {total:,}")


def percentile(values: Sequence[float], q: float) -> float:
    """Return the `q`-quantile (0..1) by nearest rank, 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_e2e_rate(results: Path) -> tuple[float, str] | None:
    """Return Conveyor's end-to-end jobs/s from the newest benchmark result, and its file."""
    for path in sorted(p for p in results.glob("*.json") if BENCH_RESULT.match(p.name))[::-1]:
        try:
            rows = json.loads(path.read_text())["summary"]
            rate = next(float(r["conveyor"]) for r in rows if r["key"] == "e2e_jobs_per_s")
        except (OSError, ValueError, KeyError, TypeError, StopIteration):
            continue  # an older or partial file: try the one before
        if rate > 0:
            return rate, path.name
    return None


def table(checks: Sequence[Check]) -> str:
    """Render the verdicts as a Markdown table."""
    lines = ["| check | result | figures |", "| --- | --- | --- |"]
    lines += [f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.detail} |" for c in checks]
    return "\n".join(lines)


def series(samples: Sequence[dict[str, Any]], key: str, name: str | None = None) -> list[Point]:
    """Pull one series out of the samples: `sample[key]`, or `sample[key][name]` if present."""
    out = []
    for sample in samples:
        value = sample.get(key)
        if name is not None:
            value = value.get(name) if isinstance(value, dict) else None
        if value is not None:
            out.append((float(sample["t"]), float(value)))
    return out


def _names(samples: Sequence[dict[str, Any]], key: str) -> list[str]:
    names: dict[str, None] = {}
    for sample in samples:
        names.update(dict.fromkeys(sample.get(key, {})))
    return list(names)


def evaluate(run: RunFacts, samples: Sequence[dict[str, Any]], windows: Windows) -> list[Check]:
    """Turn one run's counts and samples into the soak's verdicts."""
    tol = run.tolerance
    requests = sum(run.submit_statuses.values()) + sum(run.poll_statuses.values())
    server_errors = sum(
        n
        for statuses in (run.submit_statuses, run.poll_statuses)
        for status, n in statuses.items()
        if status >= 500 or status < 0
    )
    submitted = sum(run.submit_statuses.values())
    # A 4xx to a valid submit means a limit throttled the soak: it then tests nothing.
    refused = sum(n for status, n in run.submit_statuses.items() if 400 <= status < 500)
    target = run.rate * run.seconds
    checks = [
        count_check("zero 5xx (or unanswered requests)", server_errors, requests, "requests"),
        count_check("no submit refused (4xx: throttled?)", refused, submitted, "refused"),
        count_check(
            "no job lost (succeeded in PostgreSQL)",
            run.accepted - run.succeeded,
            run.accepted,
            "accepted jobs not succeeded",
        ),
        Check(
            "load held its rate (>= 90% of target)",
            run.accepted >= 0.9 * target,
            f"{run.accepted / run.seconds:.1f} of {run.rate:.1f} jobs/s",
        ),
        count_check(
            "every process stayed up",
            sum(1 for up in run.alive.values() if not up),
            len(run.alive),
            "processes died",
        ),
    ]
    # Ten seconds' worth of jobs may come and go in the queue without meaning anything.
    checks.append(
        flat_check(
            "worker kept up (backlog bounded)",
            series(samples, "backlog"),
            windows,
            tolerance=tol,
            floor=run.rate * 10,
            unit="jobs",
        )
    )
    for label in sorted(_names(samples, "rss_mb")):
        points = series(samples, "rss_mb", label)
        checks.append(
            flat_check(f"RSS flat: {label}", points, windows, tolerance=tol, floor=0, unit="MB")
        )
    redis_checks = [
        ("Redis memory bounded", "redis_used_mb", 0.5, "MB"),
        ("result keys bounded", "result_keys", 50, "keys"),
        ("finished jobs bounded by retention", "finished_jobs_rows", 100, "rows"),
    ]
    for name, key, floor, unit in redis_checks:
        checks.append(
            flat_check(name, series(samples, key), windows, tolerance=tol, floor=floor, unit=unit)
        )
    without_ttl = max((v for _, v in series(samples, "result_keys_without_ttl")), default=0)
    checks.append(
        Check("result keys expire (none without TTL)", without_ttl == 0, f"{without_ttl:.0f} max")
    )
    total: dict[float, float] = {}
    for table_name in sorted(_names(samples, "table_mb")):
        points = series(samples, "table_mb", table_name)
        for t, v in points:
            total[t] = total.get(t, 0.0) + v
        values = [v for _, v in points]
        if max(values) == min(values):
            continue  # a table the load never writes to cannot grow with it
        checks.append(
            flat_check(
                f"table bounded: {table_name}",
                points,
                windows,
                tolerance=tol,
                floor=TABLE_FLOOR_MB,
                unit="MB",
            )
        )
    checks.append(
        flat_check(
            "all tables bounded",
            sorted(total.items()),
            windows,
            tolerance=tol,
            floor=TABLE_FLOOR_MB,
            unit="MB",
        )
    )
    return checks
