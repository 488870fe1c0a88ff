"""Create a tenant with an admin user and an API key: the CLI, `make run` and test factories."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from conveyor.auth.identity import register_tenant
from conveyor.auth.keys import Principal, create_api_key
from conveyor.auth.roles import Role
from conveyor.models import ApiKey, Tenant, User


@dataclass(frozen=True)
class Identity:
    """A new tenant, its admin and the admin's API key token (shown once)."""

    tenant: Tenant
    user: User
    api_key: ApiKey
    token: str


def create_tenant_identity(
    session: Session,
    signing_key: str,
    *,
    tenant_name: str,
    email: str,
    password: str | None = None,
    key_role: Role = Role.ADMIN,
    now: datetime,
) -> Identity:
    """Insert a tenant, its admin and an API key holding `key_role`; the caller commits."""
    tenant, user = register_tenant(session, tenant_name, email, password)
    creator = Principal(tenant_id=tenant.id, role=Role.ADMIN, user_id=user.id)
    api_key, token = create_api_key(
        session,
        signing_key,
        creator,
        name=f"{tenant_name} {key_role} key",
        role=key_role,
        expires_at=None,
        now=now,
    )
    return Identity(tenant, user, api_key, token)
