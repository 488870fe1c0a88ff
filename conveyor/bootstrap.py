"""Create a tenant with an admin user and an API key: the dev set-up and test factories."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from conveyor.auth import generate_api_key
from conveyor.models import ApiKey, Tenant, User


@dataclass(frozen=True)
class Identity:
    """A new tenant, its admin and the admin's API key token (shown once)."""

    tenant: Tenant
    user: User
    api_key: ApiKey
    token: str


def create_tenant_identity(
    session: Session, signing_key: str, *, tenant_name: str, email: str, role: str = "admin"
) -> Identity:
    """Insert a tenant, a user and an API key holding `role`; the caller commits."""
    tenant = Tenant(name=tenant_name)
    session.add(tenant)
    session.flush()
    user = User(tenant_id=tenant.id, email=email.strip().lower(), role=role)
    session.add(user)
    session.flush()
    new_key = generate_api_key(signing_key)
    api_key = ApiKey(
        tenant_id=tenant.id,
        created_by=user.id,
        name=f"{tenant_name} key",
        prefix=new_key.prefix,
        secret_hash=new_key.secret_hash,
        role=role,
    )
    session.add(api_key)
    session.flush()
    return Identity(tenant, user, api_key, new_key.token)
