"""The benchmark's arithmetic (bench/stats.py) and fixed-rate load (bench/fixed_rate.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from bench import growth
from bench.cpu import CpuMeter
from bench.fixed_rate import fixed_rate_load
from bench.run import summarise
from bench.stats import interleaved, paired_ratios, paired_spread, percentile, send_times, spread
from conveyor.auth.bootstrap import Identity
from conveyor.models import Job
from tests.factories import job_factory


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile(list(range(101)), 99) == 99
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_spread_reports_median_range_and_quartiles() -> None:
    found = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (found.median, found.low, found.high, found.q1, found.q3, found.n) == (3, 1, 5, 2, 4, 5)
    assert found.text(1) == "3.0 (1.0-5.0)"


def test_ratios_pair_rounds_instead_of_dividing_medians() -> None:
    # The machine got twice as busy halfway: each round Conveyor is 0.5x the baseline,
    # which the ratio of the medians (3.0 / 4.0 = 0.75x) would hide.
    conveyor = [1.0, 1.0, 3.0, 4.0, 4.0]
    bare = [2.0, 2.0, 6.0, 8.0, 8.0]
    assert paired_ratios(conveyor, bare) == [0.5] * 5
    found = paired_spread(conveyor, bare)
    assert found is not None
    assert (found.median, found.low, found.high) == (0.5, 0.5, 0.5)


def test_ratios_skip_missing_and_zero_rounds() -> None:
    assert paired_ratios([1.0, 2.0, 3.0], [2.0, 0.0]) == [0.5]
    assert paired_spread([1.0], []) is None


def test_summary_rows_carry_paired_ratios_for_each_baseline() -> None:
    results = {
        "conveyor": {"submit_rps": [100.0, 300.0, 200.0]},
        "bare": {"submit_rps": [200.0, 300.0, 100.0]},
        "bare-sync": {"submit_rps": [50.0, 150.0, 100.0]},
    }
    (row,) = summarise(results)
    assert row["key"] == "submit_rps"
    assert row["conveyor"] == 200.0
    assert row["bare"] == 200.0
    # Per round: 0.5, 1.0, 2.0 -> median 1.0, range 0.5-2.0.
    assert row["ratio"] == 1.0
    assert (row["ratio_spread"]["low"], row["ratio_spread"]["high"]) == (0.5, 2.0)
    assert row["ratio_sync"] == 2.0
    assert row["bare_sync"] == 100.0


def test_send_times_are_fixed_in_advance_at_the_rate() -> None:
    times = list(send_times(500, 2, start=10.0))
    assert len(times) == 1000
    assert times[0] == 10.0
    assert times[1] - times[0] == pytest.approx(0.002)
    assert times[-1] == pytest.approx(10.0 + 999 / 500)
    assert list(send_times(0, 5)) == []


def test_rounds_alternate_which_stack_goes_first() -> None:
    names = ["conveyor", "bare", "bare-sync"]
    assert interleaved(names, 0) == names
    assert interleaved(names, 1) == ["bare-sync", "bare", "conveyor"]
    assert interleaved(names, 2) == names


def test_cpu_per_operation_counts_new_processes_and_drops_none() -> None:
    before = {"api": {1: 10.0, 2: 5.0}, "redis": {9: 1.0}}
    after = {"api": {1: 11.0, 2: 5.5, 3: 0.5}, "redis": {9: 1.2}}
    per_op = CpuMeter.per_op(before, after, 1000)
    assert per_op["api"] == pytest.approx(2.0)  # (1.0 + 0.5 + 0.5) s over 1,000 ops
    assert per_op["redis"] == pytest.approx(0.2)
    assert per_op["total"] == pytest.approx(2.2)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay = 0.0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(self.delay)
        body = b'{"ok": true}'
        self.send_response(202)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def _serve(delay: float) -> Iterator[int]:
    handler = type("Handler", (_Handler,), {"delay": delay})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fast_port() -> Iterator[int]:
    yield from _serve(0.0)


@pytest.fixture
def slow_port() -> Iterator[int]:
    yield from _serve(0.05)


def test_fixed_rate_sends_on_schedule_and_keeps_connections(fast_port: int) -> None:
    found = fixed_rate_load(fast_port, "POST", "/jobs", "{}", {}, rate=200, seconds=1.0)
    assert found.sent == 200
    assert found.completed == 200
    assert found.errors == 0
    assert found.achieved_rps == pytest.approx(200, rel=0.1)
    assert found.p50_ms < 50


def test_fixed_rate_counts_queueing_from_the_intended_send_time(slow_port: int) -> None:
    # One connection, 50 ms per request, 100 requests/s asked: the server falls behind by
    # half a request per request. A generator that waited for answers would report 50 ms;
    # counted from the schedule, the last requests waited ~0.5 s.
    found = fixed_rate_load(
        slow_port, "POST", "/jobs", "{}", {}, rate=100, seconds=0.5, max_connections=1
    )
    assert found.completed == 50
    assert found.achieved_rps < 25
    assert found.p99_ms > 1000
    assert found.p50_ms > 500


def test_growth_fills_a_finished_history_and_prunes_its_older_half(
    identity: Identity,
    engine: Engine,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(growth, "CHUNK", 1000)  # three statements, from two threads
    filler = growth.Filler(engine, identity.tenant.id, "default")
    filler.fill_to(2500)
    filler.fill_to(4000)
    with sessions.begin() as session:
        fresh = job_factory(session, identity.tenant.id).id
    assert filler.count() == 4001
    with engine.connect() as conn:
        states = conn.execute(
            text("SELECT state, count(DISTINCT finished_at) FROM jobs GROUP BY state")
        ).all()
    # Every filled job finished, each at its own millisecond (the numbering continued).
    assert dict(states) == {"succeeded": 4000, "queued": 0}
    deleted, _ = filler.prune_half()
    assert deleted == 2000
    with engine.connect() as conn:
        oldest = conn.execute(text("SELECT min(finished_at) FROM jobs")).scalar_one()
    assert oldest >= filler.base - timedelta(milliseconds=2000)
    filler.forget_new()
    assert filler.count() == 2000
    with sessions.begin() as session:
        assert session.get(Job, fresh) is None
