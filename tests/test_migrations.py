"""Migrations: one head per branch (the core's, each domain's), the models match what
`conveyor migrate` builds, and a database migrated before the domains were plugins upgrades."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from click.testing import CliRunner
from sqlalchemy import Engine, create_engine, inspect, text

from conveyor.cli import main
from conveyor.migrations import upgrade
from conveyor.models import Base
from conveyor.plugins import load_domains
from conveyor.settings import Settings
from tests.conftest import ROOT, TEST_SECRET_KEY, alembic_config

CORE_VERSIONS = ROOT / "migrations" / "versions"


def migrated_url(make_database: Callable[[], str]) -> str:
    return Settings(database_url=make_database(), secret_key=TEST_SECRET_KEY).sqlalchemy_url


def versions(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT version_num FROM alembic_version")))


def model_differences(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def test_the_core_and_each_domain_have_one_head_on_branches_of_their_own() -> None:
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    domains = {d.name: d.migrations for d in load_domains() if d.migrations is not None}
    assert "orders" in domains  # the sample domain, found through its entry point
    where = {rev.revision: Path(rev.path).parent for rev in script.walk_revisions()}
    heads = Counter(where[head] for head in script.get_heads())
    assert heads == Counter([CORE_VERSIONS, *domains.values()])
    for name, directory in domains.items():
        assert where[script.get_revision(f"{name}@head").revision] == directory
    # No chain crosses a boundary: a domain's revisions come down from its own, the core's
    # from the core's (a domain reaches the core through depends_on only).
    for rev in script.walk_revisions():
        downs = rev.down_revision
        for down in (downs,) if isinstance(downs, str) else downs or ():
            assert where[down] == where[rev.revision], rev.revision


def test_upgrade_matches_models_and_downgrade_undoes_it(make_database: Callable[[], str]) -> None:
    url = migrated_url(make_database)
    config = alembic_config(url)
    upgrade(config)
    engine = create_engine(url)
    try:
        assert model_differences(engine) == []
        assert {"orders", "daily_revenue"} <= set(inspect(engine).get_table_names())
        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        upgrade(config)
        assert {"jobs", "job_events", "tenants", "users", "api_keys", "orders"} <= set(
            inspect(engine).get_table_names()
        )
        assert model_differences(engine) == []
    finally:
        engine.dispose()


def heads() -> set[str]:
    """Return the revision at the head of each branch (the core's and each domain's)."""
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    return set(script.get_heads())


@pytest.mark.parametrize(
    ("old_head", "built_with"),
    [
        # The last revision before the split: the core's tables up to it and the orders
        # tables, one version row.
        ("0013", ("0013", "0007")),
        # A database that stopped where the orders revision sat in the core's chain.
        ("0007", ("0007",)),
    ],
)
def test_a_database_migrated_the_old_way_takes_conveyor_migrate(
    make_database: Callable[[], str], old_head: str, built_with: tuple[str, ...]
) -> None:
    url = migrated_url(make_database)
    # What the one old chain left: the orders tables, and a single version row.
    for revision in built_with:
        upgrade(alembic_config(url), revision)
    engine = create_engine(url)
    tenant = uuid.uuid4()
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM alembic_version"))
            conn.execute(text("INSERT INTO alembic_version VALUES (:v)"), {"v": old_head})
            conn.execute(text("INSERT INTO tenants (id, name) VALUES (:t, 'Old')"), {"t": tenant})
            conn.execute(
                text(
                    "INSERT INTO orders (tenant_id, external_id, customer_email, amount, "
                    "currency, ordered_at) VALUES (:t, 'A-1', 'a@b.test', 1, 'EUR', now())"
                ),
                {"t": tenant},
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env.update(CONVEYOR_DATABASE_URL=url, CONVEYOR_SECRET_KEY=TEST_SECRET_KEY)
        done = subprocess.run(
            [sys.executable, "-m", "conveyor.cli", "migrate", "--config", ROOT / "alembic.ini"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert versions(engine) == heads()
        assert model_differences(engine) == []
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT external_id FROM orders")) == "A-1"
    finally:
        engine.dispose()


def test_plain_alembic_is_refused_for_it_would_miss_the_domains(
    make_database: Callable[[], str],
) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", migrated_url(make_database))
    with pytest.raises(CommandError, match="conveyor migrate"):
        command.upgrade(config, "heads")


def test_conveyor_alembic_runs_alembic_with_every_branch() -> None:
    result = CliRunner().invoke(main, ["alembic", "--config", str(ROOT / "alembic.ini"), "heads"])
    assert result.exit_code == 0, result.output
    core = (heads() - {"0007"}).pop()
    assert sorted(result.output.splitlines()) == ["0007 (orders) (head)", f"{core} (head)"]
