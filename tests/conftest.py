"""Fixtures: real PostgreSQL and Redis (embedded unless URLs are given), a fresh database."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from redis import Redis
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from conveyor.bootstrap import Identity, create_tenant_identity
from conveyor.db import create_db_engine, create_session_factory
from conveyor.embedded import create_database, drop_database, embedded_services
from conveyor.settings import Settings
from conveyor.snapshots import SnapshotStore

ROOT = Path(__file__).resolve().parent.parent
TABLES = (
    "artifact_chunks, artifacts, upload_chunks, uploads, orders, daily_revenue, "
    "audit_log, webhooks, job_events, jobs, schedules, idempotency_keys, refresh_tokens, api_keys, "
    "users, tenants"
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
    """Return an Alembic config aimed at `url`, leaving pytest's logging alone."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
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


@pytest.fixture(scope="session")
def settings(server_urls: tuple[str, str], make_database: Callable[[], str]) -> Settings:
    """Settings for a migrated test database and a queue of this run's own."""
    database_url = make_database()
    command.upgrade(alembic_config(Settings(database_url=database_url).sqlalchemy_url), "head")
    return Settings(
        env="test",
        database_url=database_url,
        redis_url=server_urls[1],
        default_queue=f"conveyor-test-{uuid.uuid4().hex[:8]}",
        secret_key="test-secret-" + "x" * 32,
        db_pool_size=5,
        # Quick heartbeats so cancel requests reach running jobs within a test's patience.
        heartbeat_interval=0.2,
        # Every test client is 127.0.0.1: keep the shared limits out of the way, and give
        # this run counters of its own. The limits themselves are tested with tight ones.
        auth_rate_limit_ip="10000/minute",
        auth_rate_limit_email="10000/minute",
        rate_limit_prefix=f"rl-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    """Yield an engine on the test database."""
    engine = create_db_engine(settings)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sessions(engine: Engine, settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Return the session factory code under test uses, writing job snapshots as it does."""
    redis = Redis.from_url(settings.redis_url)
    yield create_session_factory(engine, SnapshotStore(redis, settings.result_expires))
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
            settings.secret_key,
            tenant_name="Acme",
            email="admin@acme.test",
            now=datetime.now(UTC),
        )


@pytest.fixture(scope="session")
def redis_client(settings: Settings) -> Iterator[Redis]:
    """Yield a Redis client on the test broker and result backend."""
    client = Redis.from_url(settings.redis_url)
    yield client
    client.close()


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
    from conveyor.auth import Principal, create_api_key
    from conveyor.roles import Role

    admin = Principal(tenant_id=identity.tenant.id, role=Role.ADMIN, user_id=identity.user.id)
    tokens = {}
    with sessions.begin() as session:
        for role in Role:
            _, tokens[role.value] = create_api_key(
                session,
                settings.secret_key,
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


@pytest.fixture(scope="module")
def worker(settings: Settings) -> Iterator[Any]:
    """Run a real Celery worker (thread pool) consuming this run's queue."""
    import celery.contrib.testing.tasks  # noqa: F401 - registers the ping task start_worker needs
    from celery.contrib.testing.worker import start_worker

    from worker.app import create_celery_app

    app = create_celery_app(settings)
    with start_worker(
        app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30
    ):
        yield app
    app.conveyor.engine.dispose()
