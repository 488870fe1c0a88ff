"""Fixtures: real PostgreSQL and Redis (embedded unless URLs are given), a fresh database."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from kombu.exceptions import ChannelError
from pydantic import SecretStr
from redis import Redis
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity, create_tenant_identity
from conveyor.broker.config import create_celery
from conveyor.broker.internals import reset_worker_shutdown_flag
from conveyor.broker.publisher import CeleryPublisher
from conveyor.db import create_db_engine, create_session_factory
from conveyor.ledger.states import JobState
from conveyor.ledger.work import UnitOfWork, Work
from conveyor.live.store import LiveStore
from conveyor.migrations import alembic_config as conveyor_alembic_config
from conveyor.migrations import upgrade
from conveyor.models import JobEvent
from conveyor.settings import Settings
from devtools.embedded import create_database, drop_database, embedded_services

ROOT = Path(__file__).resolve().parent.parent
# This run's signing secret: random, as every secret must be (no shared default exists).
TEST_SECRET_KEY = secrets.token_urlsafe(32)
# A statement that writes the ledger's tables (DESIGN.md: only conveyor.ledger may).
LEDGER_WRITE = re.compile(
    r"\b(UPDATE\s+(jobs|job_events)|INSERT\s+INTO\s+(jobs|job_events)|DELETE\s+FROM\s+(jobs|job_events))\b",
    re.IGNORECASE,
)
# Who may send one: the ledger itself, and tests, migrations and the benchmark's bulk
# history of finished jobs (bench/growth.py) setting the scene.
LEDGER_WRITERS = ("conveyor/ledger/", "tests/", "migrations/", "bench/growth.py")
LEDGER_WRITES_ELSEWHERE: list[str] = []
TABLES = (
    "artifact_chunks, artifacts, upload_chunks, uploads, orders, daily_revenue, "
    "audit_log, webhooks, job_events, jobs, schedules, idempotency_keys, refresh_tokens, api_keys, "
    "users, tenants"
)


def _ledger_writer(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
    """Note a write to `jobs` or `job_events` sent by project code outside the ledger."""
    if not LEDGER_WRITE.search(statement):
        return
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(ROOT) and ".venv" not in path.parts:
            where = path.relative_to(ROOT).as_posix()
            if not where.startswith(LEDGER_WRITERS):
                LEDGER_WRITES_ELSEWHERE.append(f"{where}:{frame.f_lineno}: {statement[:120]}")
            return
        frame = frame.f_back


@pytest.fixture(scope="session", autouse=True)
def ledger_writes_watched() -> Iterator[None]:
    """Watch every engine in this process for ledger writes from outside `conveyor.ledger`."""
    event.listen(Engine, "before_cursor_execute", _ledger_writer)
    yield
    event.remove(Engine, "before_cursor_execute", _ledger_writer)


@pytest.fixture(autouse=True)
def only_the_ledger_writes_jobs(ledger_writes_watched: None) -> Iterator[None]:
    """Fail a test in which code outside the ledger wrote `jobs` or `job_events`."""
    LEDGER_WRITES_ELSEWHERE.clear()
    yield
    assert not LEDGER_WRITES_ELSEWHERE, "written outside conveyor.ledger: " + "; ".join(
        LEDGER_WRITES_ELSEWHERE
    )


@pytest.fixture(scope="session")
def server_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Yield (admin PostgreSQL URL, Redis URL): the given ones, or throwaway embedded servers."""
    given_db = os.environ.get("CONVEYOR_DATABASE_URL")
    given_redis = os.environ.get("CONVEYOR_REDIS_URL")
    if given_db and given_redis:
        yield given_db.replace("postgresql+psycopg://", "postgresql://"), given_redis
        return
    with embedded_services(tmp_path_factory.mktemp("servers"), persist=False) as urls:
        yield urls


def alembic_config(url: str) -> Config:
    """Return Conveyor's Alembic config (every domain's revisions) aimed at `url`, leaving
    pytest's logging alone."""
    config = conveyor_alembic_config(ROOT / "alembic.ini", url=url)
    config.attributes["configure_logger"] = False
    return config


@pytest.fixture(scope="session")
def make_database(server_urls: tuple[str, str]) -> Iterator[Callable[[], str]]:
    """Yield a factory of fresh, empty databases on the test server, dropped at the end."""
    admin_url = server_urls[0]
    created: list[str] = []

    def make() -> str:
        name = f"conveyor_test_{uuid.uuid4().hex[:10]}"
        created.append(name)
        return create_database(admin_url, name)

    yield make
    for name in created:
        drop_database(admin_url, name)


# RabbitMQ for the tests marked `brokers`, when one is given (`.ci/run` gives the local one).
AMQP_URL = os.environ.get("CONVEYOR_TEST_AMQP_URL")
# The `brokers` tests' parameters. Redis is `None`, the cache key of the unparametrized
# `broker` fixture every other test uses: moving between those tests and the Redis run of a
# `brokers` test then rebuilds no session fixture, and no module's worker restarts.
BROKER_PARAMS = [pytest.param(None, id="redis")] + (
    [pytest.param("amqp", id="amqp")] if AMQP_URL else []
)
# The queues (and their same-named exchanges) this run declared on RabbitMQ, deleted at the
# end. The guest user cannot create a vhost of its own (only the management API or
# rabbitmqctl can), so each run keeps to queue names no other run uses.
AMQP_QUEUES: set[str] = set()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each `brokers` test on Redis, and on RabbitMQ too when one is given."""
    if metafunc.definition.get_closest_marker("brokers") and "broker" in metafunc.fixturenames:
        metafunc.parametrize("broker", BROKER_PARAMS, indirect=True, scope="session")


def pytest_report_header() -> str:
    """Say which brokers the `brokers` tests run on, and why only one when so."""
    if AMQP_URL:
        return f"brokers: redis, amqp ({AMQP_URL.split('@')[-1]})"
    return "brokers: redis only (CONVEYOR_TEST_AMQP_URL unset: no RabbitMQ given)"


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> str:
    """Return the broker a test runs on: Redis unless a `brokers` test asks for AMQP."""
    return str(getattr(request, "param", None) or "redis")


def fresh_queue(settings: Settings, prefix: str) -> str:
    """Return a queue name no other test uses, deleted at the end if it lives on RabbitMQ."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    if settings.amqp_broker:
        AMQP_QUEUES.add(name)
    return name


def delete_amqp_queues(url: str, names: Iterable[str]) -> None:
    """Delete queues and their same-named exchanges from RabbitMQ."""
    from kombu import Connection

    with Connection(url) as conn:
        for name in names:
            # A failed delete closes its channel: one channel each.
            for delete in ("queue_delete", "exchange_delete"):
                with conn.channel() as channel, contextlib.suppress(ChannelError):
                    getattr(channel, delete)(name)


@pytest.fixture(scope="session")
def base_settings(server_urls: tuple[str, str], make_database: Callable[[], str]) -> Settings:
    """Settings for a migrated test database, Redis and a queue of this run's own."""
    database_url = make_database()
    settings = Settings(
        env="test",
        database_url=database_url,
        redis_url=server_urls[1],
        default_queue=f"conveyor-test-{uuid.uuid4().hex[:8]}",
        secret_key=TEST_SECRET_KEY,
        db_pool_size=5,
        # Quick heartbeats so cancel requests reach running jobs within a test's patience.
        heartbeat_interval=0.2,
        # Every test client is 127.0.0.1: keep the shared limits out of the way, and give
        # this run counters of its own. The limits themselves are tested with tight ones.
        auth_rate_limit_ip="10000/minute",
        auth_rate_limit_email="10000/minute",
        rate_limit_prefix=f"rl-{uuid.uuid4().hex[:8]}",
    )
    upgrade(alembic_config(settings.sqlalchemy_url))
    return settings


@pytest.fixture(scope="session")
def amqp_settings(base_settings: Settings) -> Iterator[Settings]:
    """Yield the test settings on RabbitMQ, with this run's queue; delete its queues after."""
    if not AMQP_URL:
        pytest.skip("RabbitMQ only, and CONVEYOR_TEST_AMQP_URL is unset")
    moved = base_settings.model_copy(update={"broker_url": SecretStr(AMQP_URL)})
    moved = moved.model_copy(update={"default_queue": fresh_queue(moved, "conveyor-test-amqp")})
    yield moved
    delete_amqp_queues(AMQP_URL, sorted(AMQP_QUEUES))


@pytest.fixture(scope="session")
def settings(broker: str, base_settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Return the test settings on the broker this test runs on (Redis unless `brokers`)."""
    if broker == "amqp":
        moved: Settings = request.getfixturevalue("amqp_settings")
        return moved
    return base_settings


@pytest.fixture(scope="session")
def engine(base_settings: Settings) -> Iterator[Engine]:
    """Yield an engine on the test database."""
    engine = create_db_engine(base_settings)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sessions(engine: Engine) -> sessionmaker[Session]:
    """Return a plain session factory on the test database (ledger writes go through `work`)."""
    return create_session_factory(engine)


@pytest.fixture(scope="session")
def work(engine: Engine, settings: Settings) -> Iterator[Work]:
    """Return units of work as the services open them: live views written, jobs published."""
    redis = Redis.from_url(settings.redis_url.get_secret_value())
    publisher = CeleryPublisher(create_celery(settings, name="test-work"))
    yield Work(engine, LiveStore(redis, settings.result_expires), publisher)
    redis.close()


@pytest.fixture
def db_session(engine: Engine) -> Iterator[Session]:
    """Yield a session whose work is rolled back after the test (savepoint recipe)."""
    with engine.connect() as connection:
        transaction = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            transaction.rollback()


@pytest.fixture
def unit(db_session: Session) -> UnitOfWork:
    """Return a unit of work on the rolled-back test session (its views and messages unsent)."""
    return UnitOfWork.around(db_session)


@pytest.fixture
def committed(engine: Engine) -> Iterator[None]:
    """Let a test commit for real (other connections, a worker), then empty the tables."""
    yield
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} CASCADE"))


@pytest.fixture
def identity(committed: None, sessions: sessionmaker[Session], settings: Settings) -> Identity:
    """Return a committed tenant with an admin API key."""
    with sessions.begin() as session:
        return create_tenant_identity(
            session,
            settings.secret_key.get_secret_value(),
            tenant_name="Acme",
            email="admin@acme.test",
            now=datetime.now(UTC),
        )


@pytest.fixture(scope="session")
def redis_client(base_settings: Settings) -> Iterator[Redis]:
    """Yield a Redis client on the test result backend (and broker, unless on RabbitMQ)."""
    client = Redis.from_url(base_settings.redis_url.get_secret_value())
    yield client
    client.close()


_CONTROL_APPS: dict[str, Any] = {}


def waiting(settings: Settings, queue: str | None = None) -> int | None:
    """Return how many messages wait in a queue (the default one), on either broker."""
    from conveyor.broker.config import create_celery
    from conveyor.queues import broker_depths

    if settings.broker not in _CONTROL_APPS:
        _CONTROL_APPS[settings.broker] = create_celery(settings, name="test-depth")
    queue = queue or settings.default_queue
    return broker_depths(_CONTROL_APPS[settings.broker], [queue])[queue]


def row_counts(sessions: sessionmaker[Session], *tables: str) -> dict[str, int]:
    """Return how many rows each table holds: a refused request must have written none."""
    with sessions() as session:
        return {
            table: session.scalar(text(f"SELECT count(*) FROM {table}")) or 0 for table in tables
        }


def transitions(sessions: sessionmaker[Session], job_id: str) -> list[tuple[str | None, str]]:
    """Return a job's history as (from, to) pairs, oldest first."""
    with sessions() as session:
        rows = session.execute(
            select(JobEvent.from_state, JobEvent.to_state)
            .where(JobEvent.job_id == uuid.UUID(job_id))
            .order_by(JobEvent.id)
        ).all()
    return [(source, target) for source, target in rows]


def most_at_once(events: Iterable[tuple[str | None, str]]) -> int:
    """Replay (from, to) transitions in ledger order; return the most jobs running at once."""
    running = peak = 0
    for source, target in events:
        running += (target == JobState.RUNNING) - (source == JobState.RUNNING)
        peak = max(peak, running)
    return peak


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def app(settings: Settings) -> Iterator[Any]:
    """Yield the API built by its factory on the test settings."""
    from api import create_app

    flask_app = create_app(settings)
    yield flask_app
    flask_app.extensions["conveyor"].engine.dispose()


@pytest.fixture
def make_app(settings: Settings) -> Iterator[Callable[..., Any]]:
    """Build apps on the test settings with overrides and rate-limit counters of their own."""
    from api import create_app

    apps: list[Any] = []

    def make(**update: Any) -> Any:
        changes = {"rate_limit_prefix": f"rl-{uuid.uuid4().hex}", **update}
        app = create_app(settings.model_copy(update=changes))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["conveyor"].engine.dispose()


@pytest.fixture
def client(app: Any) -> Any:
    """Return a Flask test client."""
    return app.test_client()


@pytest.fixture
def auth(identity: Identity) -> dict[str, str]:
    """Return headers carrying the test tenant's API key."""
    return {"Authorization": f"Bearer {identity.token}"}


@pytest.fixture
def role_tokens(
    identity: Identity, sessions: sessionmaker[Session], settings: Settings
) -> dict[str, str]:
    """Return an API key token per role, all in the test tenant, created by its admin."""
    from conveyor.auth.keys import Principal, create_api_key
    from conveyor.auth.roles import Role

    admin = Principal(tenant_id=identity.tenant.id, role=Role.ADMIN, user_id=identity.user.id)
    tokens = {}
    with sessions.begin() as session:
        for role in Role:
            _, tokens[role.value] = create_api_key(
                session,
                settings.secret_key.get_secret_value(),
                admin,
                name=f"{role} key",
                role=role,
                expires_at=None,
                now=datetime.now(UTC),
            )
    return tokens


def bearer(token: str) -> dict[str, str]:
    """Return an Authorization header for `token`."""
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def in_process_worker(app: Any) -> Iterator[Any]:
    """Run `app`'s Celery worker in a thread of this process (thread pool) for the block."""
    import celery.contrib.testing.tasks  # noqa: F401 - registers the ping task start_worker needs
    from celery.contrib.testing.worker import start_worker

    try:
        with start_worker(
            app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30
        ) as running:
            # The event loop sleeps until its next timer (up to 10 s on an idle AMQP
            # connection) before it notices the stop: a frequent no-op timer lets it stop at once.
            running.timer.call_repeatedly(0.5, lambda: None)
            yield running
    finally:
        # start_worker stops its worker with a process-wide flag, and leaves it set when
        # the worker thread outstays shutdown_timeout: every later in-process worker would
        # then stop before it is ready, and hang its test at start instead of this one failing.
        reset_worker_shutdown_flag()


@pytest.fixture(scope="module")
def worker(settings: Settings) -> Iterator[Any]:
    """Run a real Celery worker (thread pool) consuming this run's queue, on its broker."""
    from worker.app import create_celery_app

    app = create_celery_app(settings)
    with in_process_worker(app):
        yield app
    app.conveyor.engine.dispose()


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver on 127.0.0.1: records deliveries; answers 500 to the first `failures`."""

    received: list[tuple[dict[str, str], bytes]] = []  # noqa: RUF012 - per-test, reset below
    failures = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(({k: v for k, v in self.headers.items()}, body))
        failing = len(type(self).received) <= type(self).failures
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver(worker: Any) -> Iterator[str]:
    """Yield the URL of a fresh `Receiver`, which the worker's outbound guard lets it reach."""
    Receiver.received, Receiver.failures = [], 0
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker.conveyor.settings.outbound_allow_hosts.append("127.0.0.1")
    yield f"http://127.0.0.1:{server.server_port}/hook"
    worker.conveyor.settings.outbound_allow_hosts.remove("127.0.0.1")
    server.shutdown()
    server.server_close()
