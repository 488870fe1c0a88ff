"""Alembic environment: the URL comes from Conveyor's settings unless a caller sets one.

The config comes from `conveyor.migrations.alembic_config` (`conveyor migrate`, `conveyor
alembic …`), which adds every installed domain's revisions; the domains' models join the
metadata here, for autogenerate.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import create_engine, pool

from conveyor.migrations import DOMAINS_ATTRIBUTE
from conveyor.models import Base
from conveyor.plugins import load_models
from conveyor.settings import Settings

config = context.config
if DOMAINS_ATTRIBUTE not in config.attributes:
    raise CommandError(
        "run migrations with `conveyor migrate` (or `conveyor alembic …`): plain `alembic` "
        "knows only the core's revisions, not the domains' (conveyor/migrations.py)"
    )
load_models(config.attributes[DOMAINS_ATTRIBUTE])
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    """Prefer a URL set on the Alembic config (tests), else the settings' URL."""
    return config.get_main_option("sqlalchemy.url") or Settings().sqlalchemy_url


def run_migrations_offline() -> None:
    """Emit SQL without a connection (`conveyor alembic upgrade heads --sql`)."""
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on a live connection, in one transaction."""
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
