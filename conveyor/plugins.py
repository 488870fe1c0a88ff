"""Business domains as plugins: what a domain package exposes, and how Conveyor finds it.

A domain (the sample: `domains.orders`) is a package outside `api/` and `worker/` that
exposes a `Domain` under the entry-point group `conveyor.domains` of its distribution
(`[project.entry-points."conveyor.domains"]` in its `pyproject.toml`). The API and the
worker load every domain found there, through the same functions: its job-type modules
into the one registry (`job_registry`), its routes into the API (`Domain.blueprint`, given
the `Web` the API lends it), its models and migrations into Alembic
(`conveyor.migrations`). Nothing in Conveyor names a domain, and a domain imports only
`conveyor` and third-party packages: a team replaces one by installing another.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from conveyor.registry import JobRegistry, load_job_types
from conveyor.settings import Settings

if TYPE_CHECKING:
    # Only the API builds routes: the worker loads domains without importing Flask.
    from flask_openapi3.blueprint import APIBlueprint
    from flask_openapi3.types import ResponseDict
    from redis import Redis
    from sqlalchemy.orm import Session, sessionmaker

    from conveyor.auth.keys import Principal
    from conveyor.auth.roles import Permission

ENTRY_POINT_GROUP = "conveyor.domains"
# Job types every Conveyor has, whatever domains are installed and whatever the settings say.
PLATFORM_JOB_MODULES = (
    "conveyor.jobtypes.system",
    "conveyor.jobtypes.http",
    "conveyor.jobtypes.webhooks",
)
V = TypeVar("V", bound=Callable[..., Any])


class Web(Protocol):
    """What the API lends a domain's routes, so that no domain imports `api`."""

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Return plain transactions on the database, for the domain's own tables."""

    @property
    def redis(self) -> Redis:
        """Return the API's Redis (the result backend), for caches the domain keeps there."""

    def blueprint(
        self, name: str, import_name: str, *, description: str, url_prefix: str | None = None
    ) -> APIBlueprint:
        """Return a blueprint, its own section of the docs, whose operations need a bearer."""

    def requires(self, permission: Permission | None = None) -> Callable[[V], V]:
        """Mark a view as needing a caller holding `permission`, checked before its input."""

    def responses(self, ok: ResponseDict, *errors: int) -> ResponseDict:
        """Document an operation's successful answers and the problems it can answer."""

    def principal(self) -> Principal:
        """Return the caller of a view marked with `requires`."""


@dataclass(frozen=True)
class Domain:
    """A business domain: its job types, routes, tables and migrations, all optional.

    Modules are named, not imported, so that loading a domain imports only what a process
    uses: the worker never imports its routes (nor Flask), the API imports its routes.
    """

    name: str
    # Modules whose import registers job types (`conveyor.registry.job_type`).
    job_modules: tuple[str, ...] = ()
    # The module whose import declares the domain's tables on `conveyor.models.Base`.
    models: str | None = None
    # `module:function`; the function takes the API's `Web` and returns an `APIBlueprint`.
    routes: str | None = None
    # The directory of the domain's Alembic revisions: a branch of its own.
    migrations: Path | None = None

    def blueprint(self, web: Web) -> APIBlueprint | None:
        """Build the domain's routes on what the API lends them (None: it has no routes)."""
        if self.routes is None:
            return None
        build: Callable[[Web], APIBlueprint] = pkgutil.resolve_name(self.routes)
        return build(web)


def load_domains() -> tuple[Domain, ...]:
    """Return every installed domain (entry-point group `conveyor.domains`), by name."""
    found: dict[str, Domain] = {}
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        domain = point.load()
        if not isinstance(domain, Domain):
            msg = f"entry point {point.name} = {point.value!r} is not a conveyor.plugins.Domain"
            raise TypeError(msg)
        if domain.name in found:
            raise ValueError(f"two installed domains are called {domain.name!r}")
        found[domain.name] = domain
    return tuple(found.values())


def job_modules(settings: Settings, domains: Iterable[Domain]) -> tuple[str, ...]:
    """Return the job-type modules: the platform's, every domain's, then the settings' extras."""
    listed = [*PLATFORM_JOB_MODULES, *(m for d in domains for m in d.job_modules)]
    return tuple(dict.fromkeys([*listed, *settings.job_modules]))


def job_registry(settings: Settings, domains: Iterable[Domain] | None = None) -> JobRegistry:
    """Load every job type the API and the worker both know, and return the registry."""
    modules = job_modules(settings, load_domains() if domains is None else domains)
    try:
        return load_job_types(modules)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        listed = [m for m in settings.job_modules if f"{m}.".startswith(f"{missing}.")]
        if not missing or not listed:
            raise
        msg = (
            f"CONVEYOR_JOB_MODULES lists {listed[0]!r}, which cannot be imported; it lists "
            "extra job-type modules only (the platform's and the domains' load by themselves)"
        )
        raise ImportError(msg) from exc


def load_models(domains: Iterable[Domain]) -> None:
    """Import every domain's models, so their tables join `conveyor.models.Base.metadata`."""
    for domain in domains:
        if domain.models is not None:
            importlib.import_module(domain.models)
