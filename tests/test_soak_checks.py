"""The soak's verdicts (bench/soak_checks.py): pure functions of counts and samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.processes import procfile_commands
from bench.soak_checks import (
    RunFacts,
    Windows,
    bench_e2e_rate,
    evaluate,
    flat_check,
    percentile,
    plan_windows,
    window_median,
)

WINDOWS = Windows(early=(90, 150), late=(240, 300))


def ramp(
    start: float, per_second: float, spike_at: float | None = None
) -> list[tuple[float, float]]:
    """Return samples every 5 s over 300 s, growing linearly, with one optional spike."""
    return [(t, start + per_second * t + (500 if t == spike_at else 0)) for t in range(0, 301, 5)]


def test_windows_follow_warm_up_and_shrink_for_short_runs() -> None:
    assert plan_windows(300, retention=60) == WINDOWS
    assert plan_windows(300, retention=60, warmup=30) == Windows((30, 90), (240, 300))
    # One minute: quarter-length windows, the early one as late as the run allows.
    assert plan_windows(60, retention=60) == Windows((30, 45), (45, 60))


def test_window_median_ignores_one_spike() -> None:
    samples = ramp(100, 0, spike_at=120)
    assert window_median(samples, (90, 150)) == 100
    assert window_median(samples, (301, 400)) is None


def test_flat_series_with_noise_passes() -> None:
    noisy = [(t, 100 + (3 if t % 10 else -3)) for t in range(0, 301, 5)]
    check = flat_check("rss", noisy, WINDOWS, tolerance=0.10, floor=0, unit="MB")
    assert check.ok, check.detail


def test_leak_fails_and_says_by_how_much() -> None:
    # 100 MB growing 0.1 MB/s: 112 MB early, 127 MB late, +13.4%.
    check = flat_check("rss", ramp(100, 0.1), WINDOWS, tolerance=0.10, floor=0, unit="MB")
    assert not check.ok
    assert "+13.4%" in check.detail


def test_shrinking_is_no_leak() -> None:
    check = flat_check("rss", ramp(200, -0.2), WINDOWS, tolerance=0.10, floor=0, unit="MB")
    assert check.ok


def test_floor_absorbs_small_absolute_growth() -> None:
    small = ramp(0.1, 0.0005)  # a tiny table gaining a few pages: +50% but +0.075 MB
    assert flat_check("t", small, WINDOWS, tolerance=0.10, floor=0.25, unit="MB").ok
    assert not flat_check("t", small, WINDOWS, tolerance=0.10, floor=0, unit="MB").ok


def test_a_series_missing_from_a_window_fails() -> None:
    died = [(t, 100.0) for t in range(0, 200, 5)]
    check = flat_check("rss", died, WINDOWS, tolerance=0.10, floor=0, unit="MB")
    assert not check.ok


def test_percentile_by_nearest_rank() -> None:
    assert percentile([], 0.5) == 0
    assert percentile([3, 1, 2], 0.5) == 2
    assert percentile(list(range(100)), 0.99) == 99


def write_bench(folder: Path, name: str, e2e: Any) -> None:
    summary = [{"key": "submit_rps", "conveyor": 1.0}, {"key": "e2e_jobs_per_s", "conveyor": e2e}]
    (folder / name).write_text(json.dumps({"summary": summary}))


def test_rate_comes_from_the_newest_bench_result(tmp_path: Path) -> None:
    assert bench_e2e_rate(tmp_path) is None
    write_bench(tmp_path, "2026-11-20.json", 30.0)
    write_bench(tmp_path, "2026-11-26.json", 40.0)
    write_bench(tmp_path, "soak-2026-11-27.json", 99.0)  # the soak's own files never count
    (tmp_path / "2026-11-25.json").write_text("{}")
    assert bench_e2e_rate(tmp_path) == (40.0, "2026-11-26.json")
    write_bench(tmp_path, "2026-11-27.json", "broken")
    assert bench_e2e_rate(tmp_path) == (40.0, "2026-11-26.json")


def samples(rss: list[tuple[float, float]], **flat: float) -> list[dict[str, Any]]:
    """Build soak samples: one api worker with the given RSS, other series constant."""
    return [
        {
            "t": t,
            "rss_mb": {"api worker 1": mb},
            "table_mb": {"jobs": flat.get("jobs_mb", 1.0), "tenants": 0.1},
            "jobs_rows": 1000,
            "finished_jobs_rows": 900,
            "backlog": flat.get("backlog", 20),
            "redis_used_mb": 2.0,
            "result_keys": 1000,
            "result_keys_without_ttl": flat.get("without_ttl", 0),
        }
        for t, mb in rss
    ]


def facts(**changes: Any) -> RunFacts:
    base: dict[str, Any] = {
        "rate": 10.0,
        "seconds": 300.0,
        "submit_statuses": {202: 3000},
        "poll_statuses": {200: 6000},
        "accepted": 3000,
        "succeeded": 3000,
        "alive": {"api": True, "worker": True, "beat": True},
    }
    return RunFacts(**{**base, **changes})


def failed(checks: list[Any]) -> list[str]:
    return [c.name for c in checks if not c.ok]


def test_a_clean_run_passes_every_check() -> None:
    checks = evaluate(facts(), samples(ramp(100, 0)), WINDOWS)
    assert failed(checks) == []
    names = [c.name for c in checks]
    assert "RSS flat: api worker 1" in names
    assert "table bounded: tenants" not in names  # unchanged tables are only in the total


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"poll_statuses": {200: 5999, 503: 1}}, "zero 5xx (or unanswered requests)"),
        ({"submit_statuses": {202: 2999, -1: 1}}, "zero 5xx (or unanswered requests)"),
        ({"submit_statuses": {202: 2990, 429: 10}}, "no submit refused (4xx: throttled?)"),
        ({"succeeded": 2999}, "no job lost (succeeded in PostgreSQL)"),
        ({"accepted": 2000, "succeeded": 2000}, "load held its rate (>= 90% of target)"),
        ({"alive": {"api": True, "beat": False}}, "every process stayed up"),
    ],
)
def test_each_count_check_fails_alone(changes: dict[str, Any], expected: str) -> None:
    assert failed(evaluate(facts(**changes), samples(ramp(100, 0)), WINDOWS)) == [expected]


def test_growth_and_keys_without_expiry_fail() -> None:
    leaky = samples(ramp(100, 0.1), without_ttl=3)
    assert failed(evaluate(facts(), leaky, WINDOWS)) == [
        "RSS flat: api worker 1",
        "result keys expire (none without TTL)",
    ]


def test_a_growing_backlog_fails() -> None:
    growing = samples(ramp(100, 0))
    for sample in growing:
        sample["backlog"] = 5 * sample["t"]  # the worker falls 5 jobs/s behind
    assert failed(evaluate(facts(), growing, WINDOWS)) == ["worker kept up (backlog bounded)"]


def test_procfile_lines_expand_like_a_shell(tmp_path: Path) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        "# a comment: not a process\n"
        "web: gunicorn --bind ${BIND:-127.0.0.1:8000} --workers ${WORKERS:-2} 'api:create_app()'\n"
    )
    commands = procfile_commands({"BIND": "127.0.0.1:9"}, procfile)
    assert commands == {
        "web": ["gunicorn", "--bind", "127.0.0.1:9", "--workers", "2", "api:create_app()"]
    }
