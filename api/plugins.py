"""What the API lends business domains (`conveyor.plugins.Web`), and their routes registered.

A domain's routes get the API's parts through this object instead of importing `api`:
its blueprints document and secure themselves as the API's own do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.types import ResponseDict
from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from api import auth, openapi
from api.services import Services
from conveyor.auth.keys import Principal
from conveyor.auth.roles import Permission
from conveyor.plugins import Domain, V, Web


@dataclass(frozen=True)
class ApiWeb:
    """The `Web` of one API app: its services, auth and OpenAPI helpers."""

    services: Services

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Return the app's plain transactions."""
        return self.services.sessions

    @property
    def redis(self) -> Redis:
        """Return the app's Redis (the result backend)."""
        return self.services.redis

    def blueprint(
        self, name: str, import_name: str, *, description: str, url_prefix: str | None = None
    ) -> APIBlueprint:
        """Return a secured blueprint in a section of the docs named after it."""
        return openapi.secured_blueprint(
            name, import_name, name, url_prefix=url_prefix, description=description
        )

    def requires(self, permission: Permission | None = None) -> Callable[[V], V]:
        """Mark a view as needing a caller holding `permission` (`api.auth.requires`)."""
        return auth.requires(permission)

    def responses(self, ok: ResponseDict, *errors: int) -> ResponseDict:
        """Document an operation's answers (`api.openapi.responses`)."""
        return openapi.responses(ok, *errors)

    def principal(self) -> Principal:
        """Return the caller of the view being served."""
        return auth.current_principal()


def domain_blueprints(services: Services, domains: Iterable[Domain]) -> tuple[APIBlueprint, ...]:
    """Build the domains' routes on this app's services."""
    web: Web = ApiWeb(services)
    built = (domain.blueprint(web) for domain in domains)
    return tuple(blueprint for blueprint in built if blueprint is not None)
