"""Alembic, configured with the core's revisions and every installed domain's branch.

Alembic reads where revisions live from its config before `migrations/env.py` runs, so
that config is built here, once, for every caller: `conveyor migrate` (the Procfile's
`release`, docker-compose's `migrate`, `make run`), `conveyor alembic`, the tests and the
benchmark. The core's revisions form one chain in `migrations/versions`; each domain's
form a branch of their own in its package (`Domain.migrations`), so `upgrade heads`
brings every one of them up and a domain's history never touches the core's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from alembic import command
from alembic.config import Config

from conveyor.plugins import Domain, load_domains

# Where `migrations/env.py` finds the domains this config was built for; a config without
# them was not built here, and would miss the domains' revisions.
DOMAINS_ATTRIBUTE = "conveyor.domains"


def alembic_config(
    config_file: str | Path = "alembic.ini",
    *,
    url: str | None = None,
    domains: Iterable[Domain] | None = None,
) -> Config:
    """Return Alembic's config with the core's and every domain's revisions (and `url`)."""
    found = load_domains() if domains is None else tuple(domains)
    # Alembic's own default is the stdout of the moment it was imported.
    config = Config(str(config_file), stdout=sys.stdout)
    script_location = config.get_main_option("script_location")
    if script_location is None:
        raise ValueError(f"{config_file} sets no script_location")
    locations = [Path(script_location) / "versions"]
    locations += [domain.migrations for domain in found if domain.migrations is not None]
    # Both values go through ConfigParser's interpolation, where `%` must be doubled.
    config.set_main_option("path_separator", "os")
    config.set_main_option(
        "version_locations", os.pathsep.join(str(p) for p in locations).replace("%", "%%")
    )
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes[DOMAINS_ATTRIBUTE] = found
    return config


def upgrade(config: Config, revision: str = "heads") -> None:
    """Bring the database to `revision`: by default the core's head and every domain's."""
    command.upgrade(config, revision)
