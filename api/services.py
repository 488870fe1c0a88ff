"""The long-lived objects a request needs, built once per process from settings."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from redis import Redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth import PrincipalCache
from conveyor.broker import CeleryPublisher, create_celery
from conveyor.db import create_db_engine, create_session_factory
from conveyor.registry import JobRegistry, load_job_types
from conveyor.settings import Settings
from conveyor.snapshots import SnapshotStore


@dataclass
class Services:
    """Settings, database, Redis, publisher and registry for one API process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    # For one-statement units of work (the status poll's fallback, (un)marking jobs published):
    # autocommit, so no BEGIN and no COMMIT/ROLLBACK round trips around the statement; a
    # single statement is atomic and its own consistent snapshot. No job transitions here.
    reads: sessionmaker[Session]
    redis: Redis
    publisher: CeleryPublisher
    registry: JobRegistry
    key_cache: PrincipalCache
    # Job state snapshots in Redis, written after every transition's commit: the poll's
    # fast path (conveyor.snapshots).
    snapshots: SnapshotStore

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        """Wire every service from settings; nothing connects until first use."""
        engine = create_db_engine(settings)
        celery = create_celery(settings, name="conveyor-api", with_result_backend=False)
        redis = Redis.from_url(settings.result_backend, socket_timeout=2, socket_connect_timeout=2)
        snapshots = SnapshotStore(redis, settings.result_expires)
        return cls(
            settings=settings,
            engine=engine,
            sessions=create_session_factory(engine, snapshots),
            reads=create_session_factory(engine.execution_options(isolation_level="AUTOCOMMIT")),
            redis=redis,
            publisher=CeleryPublisher(celery),
            registry=load_job_types(settings.job_modules),
            key_cache=PrincipalCache(settings.api_key_cache_seconds),
            snapshots=snapshots,
        )


def services() -> Services:
    """Return the current app's services."""
    found: Services = current_app.extensions["conveyor"]
    return found
