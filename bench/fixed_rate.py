"""Open-loop HTTP load at a fixed rate (what wrk2 does; wrk2 is not packaged here).

Requests go out on a schedule fixed in advance (`bench.stats.send_times`), each on an idle
keep-alive connection or a new one (at most `max_connections` at once), and each latency
runs from the request's *intended* send time: when the server falls behind, its queueing
delay shows in the percentiles instead of silently slowing the generator down
("coordinated omission"). Bounded: `rate * seconds` requests, 10 s each at most.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bench.stats import percentile, send_times

REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class FixedRateResult:
    """What a fixed-rate run achieved: its rate, latencies from intended send time, errors."""

    target_rps: float
    achieved_rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    sent: int
    completed: int
    errors: int


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


async def _exchange(conn: _Conn, request: bytes) -> tuple[int, bool]:
    """Send one request; return its status and whether the connection may be reused."""
    conn.writer.write(request)
    await conn.writer.drain()
    head = await conn.reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, keep = 0, not lines[0].startswith("HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            keep = value.strip().lower() != "close"
    if length:
        await conn.reader.readexactly(length)
    return status, keep


async def _run(
    port: int,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    rate: float,
    seconds: float,
    max_connections: int,
) -> FixedRateResult:
    loop = asyncio.get_running_loop()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    idle: list[_Conn] = []
    slots = asyncio.Semaphore(max_connections)
    latencies: list[float] = []
    errors = 0
    finished = [0.0]

    async def one(due: float) -> None:
        nonlocal errors
        async with slots:
            conn = idle.pop() if idle else None
            try:
                if conn is None:
                    conn = _Conn(*await asyncio.open_connection("127.0.0.1", port))
                status, keep = await asyncio.wait_for(_exchange(conn, request), REQUEST_TIMEOUT)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                if conn is not None:
                    conn.close()
                return
            now = loop.time()
            finished[0] = max(finished[0], now)
            if status >= 400:
                errors += 1
            else:
                latencies.append((now - due) * 1000)
            if keep:
                idle.append(conn)
            else:
                conn.close()

    start = loop.time() + 0.05
    tasks = []
    for due in send_times(rate, seconds, start):
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    if tasks:
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 5)
    for conn in idle:
        conn.close()
    took = max(finished[0], start + seconds) - start
    if not latencies:
        return FixedRateResult(rate, 0.0, 0.0, 0.0, 0.0, len(tasks), 0, errors)
    return FixedRateResult(
        target_rps=rate,
        achieved_rps=len(latencies) / took,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies),
        sent=len(tasks),
        completed=len(latencies),
        errors=errors,
    )


def fixed_rate_load(
    port: int,
    method: str,
    path: str,
    body: str | None,
    headers: dict[str, str],
    rate: float,
    seconds: float,
    max_connections: int = 256,
) -> FixedRateResult:
    """Send `rate` requests per second for `seconds` to 127.0.0.1:`port`; return the latencies."""
    raw = b"" if body is None else body.encode()
    return asyncio.run(_run(port, method, path, raw, headers, rate, seconds, max_connections))
