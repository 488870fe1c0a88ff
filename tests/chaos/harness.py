"""A whole Conveyor as real processes for the chaos suite: servers, api, workers, beat.

Everything here runs on loopback: an embedded PostgreSQL (unix socket) and an embedded Redis on
a fixed port (so a restart comes back at the same address), gunicorn, prefork Celery workers
and beat, each a subprocess in its own session so a whole tree can be killed by its pids.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg

from conveyor.auth.bootstrap import create_tenant_identity
from conveyor.db import create_db_engine, create_session_factory
from conveyor.migrations import upgrade
from conveyor.settings import Settings
from devtools.embedded import EmbeddedPostgres, EmbeddedRedis, create_database, free_port
from tests.chaos.jobtypes import SCHEMA
from tests.conftest import alembic_config, most_at_once, wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TERMINAL = ("succeeded", "failed", "cancelled", "expired")
# Bounds on recovery, not measurements: a Redis message orphaned by a killed worker comes back
# after the visibility timeout (60 s here) plus kombu's restore sweep.
SETTLE = 240


@dataclass
class Proc:
    """One started process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """Return the pid of the process we started."""
        return self.popen.pid

    def tree(self) -> list[psutil.Process]:
        """Return this process and every descendant still alive."""
        try:
            parent = psutil.Process(self.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def children(self) -> list[psutil.Process]:
        """Return the direct children (a prefork worker's pool processes)."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def kill_tree(self) -> None:
        """SIGKILL the process and all its descendants, by pid, and reap it."""
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int | None:
        """SIGTERM (warm shutdown for Celery), wait, then kill whatever is left."""
        tree = self.tree()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        return self.popen.returncode


@dataclass
class Outcome:
    """What the database says about a set of accepted jobs."""

    accepted: int
    succeeded: int
    lost: int
    duplicated: int
    overlapping: int
    states: dict[str, int]

    def line(self, scenario: str) -> str:
        """Return the summary line every scenario prints."""
        return (
            f"CHAOS {scenario}: accepted {self.accepted}, succeeded {self.succeeded}, "
            f"lost {self.lost}, duplicated {self.duplicated}"
        )


@dataclass
class Cluster:
    """PostgreSQL, Redis, api, workers and beat, started and stopped by this test run."""

    root: Path
    api_workers: int = 2
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    redis_port: int = 0
    api_url: str = ""
    token: str = ""
    # A second tenant's key: its jobs share the queues, never the pauses or limits.
    other_token: str = ""
    database_url: str = ""
    admin_url: str = ""
    _counter: int = 0

    # -- servers -----------------------------------------------------------------------
    def start_servers(self) -> None:
        """Start PostgreSQL and Redis, migrate, add the chaos tables and a tenant."""
        self.postgres = EmbeddedPostgres(self.root / "pgdata")
        self.admin_url = self.postgres.start()
        self.database_url = create_database(self.admin_url, "chaos")
        self.redis_port = free_port()
        self.start_redis()
        secret = secrets.token_urlsafe(32)
        settings = Settings(env="test", database_url=self.database_url, secret_key=secret)
        upgrade(alembic_config(settings.sqlalchemy_url))
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(SCHEMA)  # type: ignore[arg-type]
        engine = create_db_engine(settings)
        try:
            with create_session_factory(engine).begin() as session:
                self.token, self.other_token = (
                    create_tenant_identity(
                        session, secret, tenant_name=name, email=email, now=datetime.now(UTC)
                    ).token
                    for name, email in (
                        ("Chaos", "chaos@conveyor.test"),
                        ("Chaos B", "chaos-b@conveyor.test"),
                    )
                )
        finally:
            engine.dispose()
        # Extra job types, added to the platform's and the installed domains'.
        modules = ["tests.chaos.jobtypes"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        self.env.update(
            PYTHONPATH=str(ROOT),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            CONVEYOR_ENV="test",
            CONVEYOR_SECRET_KEY=secret,
            CONVEYOR_DATABASE_URL=self.database_url,
            CONVEYOR_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            CONVEYOR_DEFAULT_QUEUE=f"chaos-{uuid.uuid4().hex[:8]}",
            CONVEYOR_JOB_MODULES=json.dumps(modules),
            CONVEYOR_DATA_DIR=str(self.root / "data"),
            # Fast housekeeping, so recovery paths run within a test's patience.
            CONVEYOR_HEARTBEAT_INTERVAL="0.5",
            CONVEYOR_HEARTBEAT_TIMEOUT="5",
            CONVEYOR_PROMOTE_INTERVAL="0.5",
            CONVEYOR_SCHEDULE_INTERVAL="0.5",
            CONVEYOR_REAP_INTERVAL="1",
            CONVEYOR_RECONCILE_INTERVAL="2",
            CONVEYOR_RECONCILE_AFTER="5",
            # system.sleep may run 3,700 s, so the visibility timeout must outlast that.
            CONVEYOR_VISIBILITY_TIMEOUT="3800",
            CONVEYOR_DEFAULT_TIME_LIMIT="50",
            CONVEYOR_DB_POOL_SIZE="4",
            CONVEYOR_AUTH_RATE_LIMIT_IP="100000/minute",
            CONVEYOR_LOG_LEVEL="INFO",
        )
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)

    def start_redis(self) -> None:
        """Start Redis (no persistence: a restart loses every message) on the fixed port."""
        self.redis = EmbeddedRedis(self.root / "redis", persist=False, port=self.redis_port)
        self.redis.start()

    def stop_redis(self) -> None:
        """Stop Redis; its queues and unacked messages are gone."""
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def restart_postgres(self, down_for: Callable[[], None]) -> None:
        """Stop PostgreSQL (fast: sessions are cut), run `down_for`, start it again."""
        assert self.postgres is not None
        self.postgres.stop()
        try:
            down_for()
        finally:
            url = self.postgres.start()
        assert url == self.admin_url, (url, self.admin_url)

    # -- processes ---------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        """Start a process in its own session, logging to a file."""
        self._counter += 1
        log = self.root / "logs" / f"{self._counter:02d}-{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**self.env, **(extra_env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_api(self) -> Proc:
        """Start gunicorn on a free loopback port and wait until it answers."""
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        proc = self.spawn(
            "api",
            [
                str(BIN / "gunicorn"),
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(self.api_workers),
                "--threads",
                "4",
                "api:create_app()",
            ],
            {"PROMETHEUS_MULTIPROC_DIR": str(self._fresh_dir("prom"))},
        )
        wait_for(lambda: self._healthy(), timeout=60)
        return proc

    def _fresh_dir(self, name: str) -> Path:
        path = self.root / f"{name}-{self._counter}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/healthz", timeout=2):
                return True
        except OSError:
            return False

    def start_worker(self, name: str, concurrency: int = 2) -> Proc:
        """Start a prefork Celery worker and wait until its pool is up."""
        proc = self.spawn(
            name,
            [
                str(BIN / "celery"),
                "-A",
                "worker.main",
                "worker",
                "--pool=prefork",
                f"--concurrency={concurrency}",
                f"--hostname={name}@chaos",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=INFO",
            ],
        )
        wait_for(lambda: self._ready(proc), timeout=60)
        return proc

    @staticmethod
    def _ready(proc: Proc) -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited: {proc.log.read_text()[-3000:]}")
        return "ready." in proc.log.read_text(errors="replace")

    def start_beat(self, name: str = "beat") -> Proc:
        """Start beat (which runs housekeeping when it holds the leader lock)."""
        schedule = self.root / "data" / f"{name}-{self._counter}-schedule"
        return self.spawn(
            name,
            [
                str(BIN / "celery"),
                "-A",
                "worker.main",
                "beat",
                "--loglevel=INFO",
                f"--schedule={schedule}",
            ],
        )

    def restart_everything(self) -> None:
        """Stop every process and both servers, then start the servers and the api again."""
        for proc in reversed(self.procs):
            proc.terminate(timeout=20)
        self.stop_redis()
        self.restart_postgres(lambda: None)
        self.start_redis()
        self.start_api()

    def stop_all(self) -> None:
        """Stop every process this cluster started, then the servers."""
        for proc in reversed(self.procs):
            proc.terminate(timeout=20)
        self.stop_redis()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None

    # -- the API -----------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = 10,
        token: str | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """Send one request (as `token`, or the first tenant); return status, headers, body."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.api_url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {token or self.token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                raw = exc.read()
            try:
                decoded = json.loads(raw)
            except ValueError:
                decoded = raw.decode(errors="replace")
            return exc.code, dict(exc.headers), decoded

    def submit(
        self, job_type: str, payload: dict[str, Any], token: str | None = None, **options: Any
    ) -> tuple[int, dict[str, str], Any]:
        """Submit one job over HTTP, with submit options such as `limit_key`."""
        body = {"type": job_type, "payload": payload, **options}
        return self.request("POST", "/v1/jobs", body, token=token)

    def submit_counts(
        self,
        keys: Iterable[str],
        seconds: Callable[[int], float],
        threads: int = 8,
        token: str | None = None,
        **options: Any,
    ) -> tuple[list[str], dict[int, int]]:
        """Submit `chaos.count` jobs concurrently; return accepted ids and status counts."""
        statuses: dict[int, int] = {}
        accepted: list[str] = []
        lock = threading.Lock()

        def one(item: tuple[int, str]) -> None:
            n, key = item
            try:
                payload = {"key": key, "seconds": seconds(n)}
                status, _, body = self.submit("chaos.count", payload, token, **options)
            except OSError:
                status, body = -1, None
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status in (200, 202):
                    accepted.append(body["id"])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, enumerate(keys)))
        return accepted, statuses

    # -- the database's view -------------------------------------------------------------
    def sql(self, query: str, params: Any = None) -> list[Any]:
        """Run a query on the chaos database; return its rows."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def execute(self, query: str, params: Any = None) -> int:
        """Run a statement on the chaos database; return how many rows it touched."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return conn.execute(query, params).rowcount  # type: ignore[arg-type]

    def states(self, ids: list[str]) -> dict[str, int]:
        """Count the given jobs by state."""
        rows = self.sql(
            "SELECT state, count(*) FROM jobs WHERE id = ANY(%s::uuid[]) GROUP BY state", (ids,)
        )
        return {state: n for state, n in rows}

    def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, int]:
        """Wait (bounded) until every job in `ids` is in a terminal state; return the states."""
        deadline = time.monotonic() + timeout
        states = self.states(ids)
        while time.monotonic() < deadline:
            states = self.states(ids)
            if sum(n for s, n in states.items() if s in TERMINAL) == len(ids):
                break
            time.sleep(0.5)
        return states

    def most_running(self, ids: list[str]) -> int:
        """Replay the jobs' events in the order the ledger wrote them; return the most running.

        A claim that takes a freed slot waits for the finish (or reap) that freed it to
        commit, so its event always comes after that one.
        """
        events = self.sql(
            "SELECT from_state, to_state FROM job_events WHERE job_id = ANY(%s::uuid[]) "
            "ORDER BY id",
            (ids,),
        )
        return most_at_once(events)

    def outcome(self, ids: list[str]) -> Outcome:
        """Read accepted/succeeded/lost/duplicated for `chaos.count` jobs from PostgreSQL."""
        states = self.states(ids)
        (succeeded,) = self.sql(
            "SELECT count(*) FROM jobs j JOIN chaos_completions c ON c.job_id = j.id "
            "WHERE j.id = ANY(%s::uuid[]) AND j.state = 'succeeded'",
            (ids,),
        )[0]
        (duplicated,) = self.sql(
            "SELECT coalesce(sum(c.completions - 1), 0) FROM chaos_completions c "
            "WHERE c.job_id = ANY(%s::uuid[])",
            (ids,),
        )[0]
        (overlapping,) = self.sql(
            "SELECT count(*) FROM chaos_runs a JOIN chaos_runs b ON a.job_id = b.job_id "
            "AND a.id < b.id AND b.started_at < a.finished_at AND a.started_at < b.finished_at "
            "WHERE a.job_id = ANY(%s::uuid[])",
            (ids,),
        )[0]
        return Outcome(
            accepted=len(ids),
            succeeded=int(succeeded),
            lost=len(ids) - int(succeeded),
            duplicated=int(duplicated),
            overlapping=int(overlapping),
            states=states,
        )


def report(name: str, outcome: Outcome) -> None:
    """Print the scenario's summary line and hold it to the promise."""
    print(outcome.line(name), f"(states {outcome.states}, overlapping runs {outcome.overlapping})")
    assert outcome.lost == 0, outcome
    assert outcome.duplicated == 0, outcome
    assert outcome.overlapping == 0, outcome


def completions(cluster: Cluster) -> int:
    """Return how many `chaos.count` completions the database holds."""
    return int(cluster.sql("SELECT count(*) FROM chaos_completions")[0][0])


def busy_children(cluster: Cluster, proc_name: str) -> list[psutil.Process]:
    """Return pool processes of the named worker that are running a job right now."""
    running = {
        int(pid) for (pid,) in cluster.sql("SELECT pid FROM chaos_runs WHERE finished_at IS NULL")
    }
    return [
        child
        for proc in cluster.procs
        if proc.name == proc_name and proc.popen.poll() is None
        for child in proc.children()
        if child.pid in running
    ]
