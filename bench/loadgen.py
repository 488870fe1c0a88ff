"""HTTP load at a fixed number of connections: wrk when installed, else a bounded Python loop."""

from __future__ import annotations

import functools
import http.client
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# wrk's `done` hook prints one JSON line; latencies are in microseconds.
WRK_SCRIPT = """
local paths = {%(paths)s}
wrk.method = "%(method)s"
%(body)s
%(headers)s
request = function()
  return wrk.format(nil, paths[math.random(#paths)])
end
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format('BENCH {"requests": %%d, "duration_us": %%d, "p50_us": %%d, '
    .. '"p99_us": %%d, "errors": %%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), errors))
end
"""


@dataclass(frozen=True)
class LoadResult:
    """Throughput and latency of one load round."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0


@functools.cache
def wrk_available() -> bool:
    """Return whether wrk is installed, installing Debian's package first when we are root."""
    if shutil.which("wrk"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            try:
                subprocess.run(cmd, check=False, capture_output=True, timeout=180)
            except subprocess.TimeoutExpired:
                break
    return shutil.which("wrk") is not None


def _lua(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal here


def wrk_load(
    port: int,
    method: str,
    paths: list[str],
    body: str | None,
    headers: dict[str, str],
    connections: int,
    seconds: float,
) -> LoadResult:
    """Run `wrk -t1 -c<connections> -d<seconds>` once and parse its JSON summary."""
    script = WRK_SCRIPT % {
        "paths": ", ".join(_lua(p) for p in paths),
        "method": method,
        "body": "" if body is None else f"wrk.body = {_lua(body)}",
        "headers": "\n".join(f"wrk.headers[{_lua(k)}] = {_lua(v)}" for k, v in headers.items()),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
    try:
        done = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                fh.name,
                f"http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    finally:
        Path(fh.name).unlink()
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH "))
    stats = json.loads(line.removeprefix("BENCH "))
    return LoadResult(
        rps=stats["requests"] / (stats["duration_us"] / 1e6),
        p50_ms=stats["p50_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        errors=stats["errors"],
        requests=stats["requests"],
    )


def http_load(
    port: int,
    method: str,
    paths: list[str],
    body: str | None,
    headers: dict[str, str],
    connections: int,
    seconds: float,
) -> LoadResult:
    """Keep `connections` threads busy for `seconds` (at most 200,000 requests in all)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    budget = [200_000]

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = []
        while time.monotonic() < deadline:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            t0 = time.perf_counter()
            try:
                conn.request(method, random.choice(paths), body, headers)  # noqa: S311
                response = conn.getresponse()
                response.read()
                if response.status >= 400:
                    with lock:
                        errors[0] += 1
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                with lock:
                    errors[0] += 1
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    began = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    latencies.sort()
    if not latencies:
        return LoadResult(0.0, 0.0, 0.0, errors[0])
    return LoadResult(
        rps=len(latencies) / elapsed,
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        errors=errors[0],
        requests=len(latencies),
    )


def request_json(port: int, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    """Send `body` as JSON to the local api and return the decoded answer (a 2xx only)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            method, path, json.dumps(body), {**headers, "Content-Type": "application/json"}
        )
        response = conn.getresponse()
        data = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        return json.loads(data)
    finally:
        conn.close()


def post_json(port: int, path: str, body: Any, headers: dict[str, str]) -> Any:
    """POST `body` as JSON to the local api and return the decoded answer."""
    return request_json(port, "POST", path, body, headers)
