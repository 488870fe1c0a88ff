"""Engines and session factories; built from settings, never at import time."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from conveyor.settings import Settings
from conveyor.snapshots import SnapshotStore


def create_db_engine(settings: Settings) -> Engine:
    """Build a pooled engine; `pool_pre_ping` survives a database restart."""
    return create_engine(
        settings.sqlalchemy_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_max_overflow,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": 5,
            # psycopg prepares a query server-side after 5 runs; None never does (PgBouncer).
            **({} if settings.db_prepared_statements else {"prepare_threshold": None}),
        },
    )


def create_session_factory(
    engine: Engine, snapshots: SnapshotStore | None = None
) -> sessionmaker[Session]:
    """Build the session factory whose `begin()` owns one unit of work.

    With `snapshots`, each commit writes the job snapshots its transitions noted; every
    factory whose sessions change jobs needs it, or the status poll could serve a stale one.
    """
    # expire_on_commit=False: handlers serialise rows after the commit.
    factory = sessionmaker(engine, expire_on_commit=False)
    if snapshots is not None:
        snapshots.attach(factory)
    return factory
