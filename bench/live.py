"""Live status in `make bench` (Conveyor only): the cost of open streams, and their latency.

- Throughput: the submit and poll loads of `bench/run.py`, run without, with 1,000 open job
  streams (each watching a queued job that nothing runs, as 1,000 waiting clients would),
  and without again; the figures are the ratios with / without (the target: >= 0.9).
- Latency: with the streams open, one job at a time is claimed through the ledger (in
  this process) and its claim made durable by a heartbeat, as the worker's early heartbeat
  does, while that job's stream is read; the time runs from BEFORE that durable commit to
  the frame's arrival, so it overstates the latency by the commit's own time.
"""

from __future__ import annotations

import selectors
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import psutil
import redis
from sqlalchemy import Engine

from bench.loadgen import LoadResult, post_json
from conveyor.ledger.transitions import claim
from conveyor.ledger.upkeep import beat_heartbeats
from conveyor.ledger.work import Work
from conveyor.live.store import LiveStore

STREAMS = 1000
HEARTBEAT_SECONDS = 15  # api.streams.HEARTBEAT_SECONDS (the bench imports no api module)
LATENCY_SAMPLES = 200


def open_stream(port: int, path: str, headers: dict[str, str]) -> socket.socket:
    """Open an event stream on a raw socket; return it once its first frame arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode())
    _read_until(sock, b"\nevent: state\n")
    return sock


def _read_until(sock: socket.socket, marker: bytes, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"stream closed before {marker!r}")
        data += chunk
    return data


@contextmanager
def open_streams(
    port: int, headers: dict[str, str], job_ids: list[str]
) -> Iterator[dict[str, socket.socket]]:
    """Hold one open stream per job for the block (their heartbeats drained in the kernel)."""
    streams: dict[str, socket.socket] = {}
    try:
        for job_id in job_ids:
            streams[job_id] = open_stream(port, f"/v1/jobs/{job_id}/stream", headers)
        yield streams
    finally:
        for sock in streams.values():
            sock.close()


def queued_jobs(port: int, headers: dict[str, str], n: int) -> list[str]:
    """Submit `n` no-op jobs in batches (no worker runs them during this phase)."""
    ids: list[str] = []
    while len(ids) < n:
        size = min(1000, n - len(ids))
        body = {"jobs": [{"type": "system.noop", "payload": {}}] * size}
        ids += [item["id"] for item in post_json(port, "/v1/jobs/batch", body, headers)["items"]]
    return ids


def _drain(streams: dict[str, socket.socket]) -> None:
    """Read whatever the streams sent (heartbeats) so no buffer fills between rounds."""
    selector = selectors.DefaultSelector()
    for sock in streams.values():
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    for key, _ in selector.select(timeout=0):
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        try:
            while sock.recv(65536):
                pass
        except BlockingIOError:
            pass
    selector.close()
    for sock in streams.values():
        sock.setblocking(True)


def transition_latency(
    engine: Engine, r: redis.Redis, streams: dict[str, socket.socket], samples: int
) -> list[float]:
    """Claim `samples` watched jobs one at a time; return commit-to-frame latencies in ms."""
    work = Work(engine, LiveStore(r, 3600))
    _drain(streams)
    latencies = []
    for job_id, sock in list(streams.items())[:samples]:
        with work.single_statement() as unit:
            claimed = claim(unit, uuid.UUID(job_id), "bench-live", datetime.now(UTC))
        if claimed is None:
            continue
        # A claim commits without its WAL flush and is shown by the first durable write
        # naming it (the worker's early heartbeat, or the finish): that commit is the one
        # the stream follows, so the clock starts before it.
        began = time.perf_counter()
        with work.single_statement() as unit:
            beat_heartbeats(unit, [claimed], datetime.now(UTC))
        _read_until(sock, b'"state":"running"', timeout=10)
        latencies.append((time.perf_counter() - began) * 1000)
    return latencies


def api_cpu_seconds(api_pid: int) -> float:
    """Return the CPU time the API's processes (gunicorn master and workers) have used."""
    parent = psutil.Process(api_pid)
    total = 0.0
    for proc in [parent, *parent.children(recursive=True)]:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def _metered(load: Callable[[], LoadResult], api_pid: int) -> tuple[LoadResult, float]:
    """Run a load; return it and the API's CPU milliseconds per request it served.

    CPU per request barely moves with a busy machine, unlike req/s: it is the figure that
    shows what the open streams cost each request.
    """
    cpu, began = api_cpu_seconds(api_pid), time.monotonic()
    result = load()
    cpu, took = api_cpu_seconds(api_pid) - cpu, time.monotonic() - began
    return result, 1000 * cpu / max(1.0, result.rps * took)


def live_rounds(
    port: int,
    headers: dict[str, str],
    engine: Engine,
    r: redis.Redis,
    rounds: int,
    submit: Callable[[], LoadResult],
    poll: Callable[[], LoadResult],
    log: Callable[[str], None],
    api_pid: int,
) -> dict[str, list[float]]:
    """Measure submit and poll without and with 1,000 open streams, and transition latency."""
    out: dict[str, list[float]] = {}
    loads = {"submit": submit, "poll": poll}

    def add(key: str, value: float) -> None:
        out.setdefault(key, []).append(value)

    def measure(phase: str) -> dict[str, LoadResult]:
        results = {}
        for name, load in loads.items():
            results[name], cpu_ms = _metered(load, api_pid)
            add(f"live_{name}_cpu_ms_{phase}", cpu_ms)
        return results

    for n in range(rounds):
        # Without, with, without again: the ratio compares the middle to the mean of its
        # neighbours, so a machine getting busier or quieter meanwhile does not pass for the
        # streams' cost.
        before = measure("before")
        watched = queued_jobs(port, headers, STREAMS)
        log(f"live status round {n + 1}: opening {STREAMS} streams")
        began = time.monotonic()
        with open_streams(port, headers, watched) as streams:
            add("live_open_streams_s", time.monotonic() - began)
            during = measure("with")
            idle = api_cpu_seconds(api_pid)
            time.sleep(5)
            add("live_idle_cpu_percent_with", (api_cpu_seconds(api_pid) - idle) / 5 * 100)
            latencies = transition_latency(engine, r, streams, LATENCY_SAMPLES)
        # The server notices a closed stream at its next heartbeat write: until then the
        # streams are still open there.
        time.sleep(HEARTBEAT_SECONDS + 1)
        after = measure("after")
        for name in ("submit", "poll"):
            add(f"live_{name}_rps_before", before[name].rps)
            add(f"live_{name}_rps_after", after[name].rps)
            without = (before[name].rps + after[name].rps) / 2
            add(f"live_{name}_rps_without", without)
            add(f"live_{name}_rps_with", during[name].rps)
            add(f"live_{name}_ratio", during[name].rps / without)
            add(f"live_{name}_p99_ms_with", during[name].p99_ms)
        add("live_transition_p50_ms", statistics.median(latencies))
        add("live_transition_p99_ms", _percentile(latencies, 99))
    return out


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]
