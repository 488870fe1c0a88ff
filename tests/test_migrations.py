"""Migrations: one head, and the models match what `upgrade head` builds."""

from __future__ import annotations

from collections.abc import Callable

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from conveyor.models import Base
from conveyor.settings import Settings
from tests.conftest import TEST_SECRET_KEY, alembic_config
from worker.orders import models as orders_models

# The sample domain's tables are part of the metadata the migrations must match.
assert orders_models.Order.__tablename__ == "orders"


def test_there_is_exactly_one_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    assert len(script.get_heads()) == 1


def test_upgrade_matches_models_and_downgrade_undoes_it(make_database: Callable[[], str]) -> None:
    url = Settings(database_url=make_database(), secret_key=TEST_SECRET_KEY).sqlalchemy_url
    config = alembic_config(url)
    command.upgrade(config, "head")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        command.upgrade(config, "head")
        assert {"jobs", "job_events", "tenants", "users", "api_keys"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()
