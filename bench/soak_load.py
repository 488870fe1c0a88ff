"""The soak's moving parts: a paced HTTP load, a ledger watcher and a resource sampler.

Every loop here is bounded in count and in time, and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil
import psycopg
import redis

from conveyor.live.store import VIEW_PREFIX

NOOP = json.dumps({"type": "system.noop", "payload": {}})
TERMINAL = ("succeeded", "failed", "cancelled", "expired")
# A job is polled over HTTP at most this often; the ledger watcher is the judge after that.
MAX_POLLS = 60
# Result keys counted per sample at most: the scan stays cheap even if expiry breaks.
SCAN_LIMIT = 200_000


class Load:
    """Submit no-op jobs at a fixed rate from keep-alive threads; poll each until it succeeds."""

    def __init__(self, port: int, token: str, rate: float, seconds: float) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.rate = rate
        self.seconds = seconds
        self.total = int(rate * seconds)
        # Enough threads that a slow answer does not hold the pace back (Little's law, 0.5 s).
        self.threads = max(4, min(64, int(rate / 2)))
        self.submits: Counter[int] = Counter()
        self.polls: Counter[int] = Counter()
        self.accepted: list[tuple[str, float]] = []
        self.latencies: list[float] = []
        self.began = 0.0
        self._next = 0
        self._due: list[tuple[float, int, str, float, int]] = []
        self._lock = threading.Lock()
        self._stop_polling = threading.Event()
        self._pollers: list[threading.Thread] = []

    def _send(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: str | None
    ) -> tuple[int, bytes]:
        """Send one request on a kept-alive connection; -1 when no answer came."""
        try:
            conn.request(method, path, body, self.headers)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError:
            conn.close()  # http.client reconnects on the next request
            return -1, b""

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def run(self) -> None:
        """Submit for `seconds` (pollers keep going until `finish`); return when done."""
        self.began = time.monotonic()
        self._pollers = [threading.Thread(target=self._poller, daemon=True) for _ in range(2)]
        submitters = [
            threading.Thread(target=self._submitter, daemon=True) for _ in range(self.threads)
        ]
        for t in [*self._pollers, *submitters]:
            t.start()
        for t in submitters:
            t.join(timeout=self.seconds + 60)

    def _submitter(self) -> None:
        conn = self._connection()
        stop_at = self.began + self.seconds
        while True:
            with self._lock:
                n = self._next
                self._next += 1
            due = self.began + n / self.rate
            if n >= self.total or due > stop_at:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            if time.monotonic() > stop_at + 5:
                break  # far behind the pace: the run's length is the bound, not the count
            sent = time.monotonic()
            status, data = self._send(conn, "POST", "/v1/jobs", NOOP)
            with self._lock:
                self.submits[status] += 1
                if status in (200, 202):
                    job_id = json.loads(data)["id"]
                    self.accepted.append((job_id, sent))
                    heapq.heappush(self._due, (sent + 0.25, n, job_id, sent, 0))
        conn.close()

    def _poller(self) -> None:
        conn = self._connection()
        while not self._stop_polling.is_set():
            with self._lock:
                item = heapq.heappop(self._due) if self._due else None
            if item is None or item[0] > time.monotonic():
                if item is not None:
                    with self._lock:
                        heapq.heappush(self._due, item)
                time.sleep(0.02)
                continue
            _, n, job_id, sent, polls = item
            status, data = self._send(conn, "GET", f"/v1/jobs/{job_id}", None)
            state = json.loads(data).get("state") if status == 200 else None
            with self._lock:
                self.polls[status] += 1
                # Poll again while the job runs or the api failed to answer, as a client
                # would; a 404 ends it (pruned after retention before a lagging poll).
                again = (status == 200 and state not in TERMINAL) or not 0 < status < 500
                if state == "succeeded":
                    self.latencies.append(time.monotonic() - sent)
                elif again and polls + 1 < MAX_POLLS:
                    # Back off from 0.25 s to 2 s between polls, as conveyor.client's wait does.
                    delay = min(2.0, 0.25 * 2 ** (polls + 1))
                    heapq.heappush(
                        self._due, (time.monotonic() + delay, n, job_id, sent, polls + 1)
                    )
        conn.close()

    def accepted_since(self, start: int) -> list[str]:
        """Return the ids accepted after the first `start` ones."""
        with self._lock:
            return [job_id for job_id, _ in self.accepted[start:]]

    def accepted_count(self) -> int:
        """Return how many submits were accepted so far."""
        with self._lock:
            return len(self.accepted)

    def finish(self) -> None:
        """Stop polling and wait for the pollers."""
        self._stop_polling.set()
        for t in self._pollers:
            t.join(timeout=40)


class Ledger:
    """Follow accepted jobs in PostgreSQL until each is terminal, before retention prunes it."""

    def __init__(self, database_url: str, load: Load) -> None:
        self.database_url = database_url
        self.load = load
        self.pending: set[str] = set()
        self.succeeded = 0
        self.other: Counter[str] = Counter()
        # Accepted ids absent from the ledger: committed before their 202, so they were
        # deleted before this watcher saw them finish, or lost.
        self.missing = 0
        # Seconds from insert to finish of each succeeded job, as PostgreSQL recorded them.
        self.durations: list[float] = []
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        """Check the ledger every second from now on."""
        self._thread.start()

    def _loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.wait(1.0):
            try:
                conn = conn or psycopg.connect(self.database_url, autocommit=True)
                self.check(conn)
            except psycopg.Error:
                conn = None  # try again with a fresh connection next second

    def check(self, conn: psycopg.Connection[Any]) -> None:
        """Take newly accepted ids, then settle every pending one that reached an end."""
        fresh = self.load.accepted_since(self._seen)
        self._seen += len(fresh)
        self.pending.update(fresh)
        todo = list(self.pending)
        for start in range(0, len(todo), 5000):
            chunk = todo[start : start + 5000]
            rows = conn.execute(
                "SELECT id::text, state, extract(epoch FROM finished_at - created_at)::float "
                "FROM jobs WHERE id = ANY(%s::uuid[])",
                (chunk,),
            ).fetchall()
            states = {job_id: (state, took) for job_id, state, took in rows}
            for job_id in chunk:
                state, took = states.get(job_id, (None, None))
                if state is None:
                    self.missing += 1
                elif state == "succeeded":
                    self.succeeded += 1
                    self.durations.append(took)
                elif state in TERMINAL:
                    self.other[state] += 1
                else:
                    continue
                self.pending.discard(job_id)

    def settled(self) -> int:
        """Return how many accepted jobs reached an end (or vanished) so far."""
        return self.succeeded + sum(self.other.values()) + self.missing

    def wait_settled(self, timeout: float, stall: float = 60.0) -> None:
        """Wait until every accepted job settled, none settled for `stall` s, or `timeout`."""
        deadline = time.monotonic() + timeout
        last, last_change = self.settled(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_change < stall:
            if not self.pending and self.load.accepted_count() == self._seen:
                return
            time.sleep(0.5)
            if self.settled() != last:
                last, last_change = self.settled(), time.monotonic()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        self._thread.join(timeout=30)


class Sampler:
    """Every few seconds: RSS of every process, Redis memory and keys, table sizes."""

    def __init__(
        self,
        procs: dict[str, subprocess.Popen[bytes]],
        database_url: str,
        redis_url: str,
        interval: float,
        began: float,
        counters: Callable[[], dict[str, int]],
    ) -> None:
        self.procs = procs
        self.counters = counters
        self.database_url = database_url
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.interval = interval
        self.began = began
        self.samples: list[dict[str, Any]] = []
        self._labels: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self, seconds: float) -> None:
        """Sample from now for `seconds` (or until `stop`)."""
        self._seconds = seconds
        self._thread.start()

    def _loop(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            for _ in range(int(self._seconds / self.interval) + 2):
                t = time.monotonic() - self.began
                if t > self._seconds or self._stop.is_set():
                    break
                with contextlib.suppress(psycopg.Error, redis.RedisError):
                    sample = {"t": round(t, 2), **self.counters(), **self._rss()}
                    self.samples.append({**sample, **self._storage(conn)})
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - self.began - t)))

    def _label(self, role: str, proc: psutil.Process, is_root: bool) -> str:
        """Name a process once, stably: a replaced pid gets a new name, so restarts show."""
        if proc.pid not in self._labels:
            kind = {
                "api": ("api master", "api worker"),
                "worker": ("worker parent", "worker child"),
            }
            root_name, child = kind.get(role, (role, f"{role} child"))
            same = sum(1 for name in self._labels.values() if name.startswith(child))
            self._labels[proc.pid] = root_name if is_root else f"{child} {same + 1}"
        return self._labels[proc.pid]

    def _rss(self) -> dict[str, Any]:
        rss: dict[str, float] = {}
        for role, popen in self.procs.items():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(popen.pid)
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        mb = proc.memory_info().rss / 2**20
                        rss[self._label(role, proc, proc.pid == root.pid)] = round(mb, 2)
        return {"rss_mb": rss}

    def _storage(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        tables = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r'"
        ).fetchall()
        rows, finished = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE finished_at IS NOT NULL) FROM jobs"
        ).fetchone() or (0, 0)
        keys = without_ttl = 0
        batch: list[bytes] = []
        for key in self.redis.scan_iter(match=f"{VIEW_PREFIX}*", count=1000):
            batch.append(key)
            keys += 1
            if len(batch) == 1000 or keys >= SCAN_LIMIT:
                without_ttl += self._count_without_ttl(batch)
                batch = []
            if keys >= SCAN_LIMIT:
                break
        without_ttl += self._count_without_ttl(batch)
        memory = self.redis.info("memory")
        return {
            "table_mb": {name: round(size / 2**20, 3) for name, size in tables},
            "jobs_rows": rows,
            # Only these are retention's to bound; the others are the backlog.
            "finished_jobs_rows": finished,
            "redis_used_mb": round(memory["used_memory"] / 2**20, 3),
            "redis_keys": self.redis.dbsize(),
            "result_keys": keys,
            "result_keys_without_ttl": without_ttl,
        }

    def _count_without_ttl(self, keys: list[bytes]) -> int:
        if not keys:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.ttl(key)
            # -1: no expiry; -2: the key expired between the scan and the TTL.
            return sum(1 for ttl in pipe.execute() if ttl == -1)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.redis.close()
