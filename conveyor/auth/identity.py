"""Tenants and their users: sign-up, sign-in, and administration within a tenant."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from conveyor.auth.passwords import hash_password, verify_password
from conveyor.auth.roles import Role
from conveyor.errors import Conflict, Unauthorized, ValidationFailed
from conveyor.models import Tenant, User
from conveyor.tenancy import owned


def normalise_email(email: str) -> str:
    """Return the canonical form used for uniqueness and lookups."""
    return email.strip().lower()


def add_user(
    session: Session, tenant_id: uuid.UUID, email: str, password: str | None, role: Role
) -> User:
    """Insert a user in `tenant_id`; a taken email is a `Conflict`."""
    user = User(
        tenant_id=tenant_id,
        email=normalise_email(email),
        password_hash=hash_password(password) if password else None,
        role=role,
    )
    try:
        with session.begin_nested():
            session.add(user)
            session.flush()
    except IntegrityError as exc:
        raise Conflict(
            "that email is already registered",
            errors=[{"field": "email", "message": "already registered"}],
        ) from exc
    return user


def register_tenant(
    session: Session, tenant_name: str, email: str, password: str | None
) -> tuple[Tenant, User]:
    """Create a tenant and its first user, an admin."""
    tenant = Tenant(name=tenant_name.strip())
    session.add(tenant)
    session.flush()
    return tenant, add_user(session, tenant.id, email, password, Role.ADMIN)


def check_credentials(session: Session, email: str, password: str) -> User:
    """Return the active user these credentials belong to, else raise `Unauthorized`.

    An unknown email costs the same argon2 verification as a wrong password.
    """
    user = session.scalar(select(User).where(User.email == normalise_email(email)))
    valid = verify_password(user.password_hash if user else None, password)
    if user is None or not valid or not user.is_active:
        raise Unauthorized("the email or password is wrong")
    return user


def list_users(session: Session, tenant_id: uuid.UUID) -> Sequence[User]:
    """Return the tenant's users, oldest first."""
    return session.scalars(
        select(User).where(User.tenant_id == tenant_id).order_by(User.created_at, User.id)
    ).all()


def get_user(session: Session, tenant_id: uuid.UUID, user_id: uuid.UUID) -> User:
    """Return one of the tenant's users, or `NotFound` (also for another tenant's)."""
    return owned(session, User, user_id, tenant_id, "user")


def update_user(
    session: Session,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    *,
    acting_user_id: uuid.UUID | None,
    role: Role | None = None,
    is_active: bool | None = None,
) -> User:
    """Change a user's role or activity; admins cannot demote or deactivate themselves."""
    user = get_user(session, tenant_id, user_id)
    if user.id == acting_user_id and (
        (role is not None and role != user.role) or is_active is False
    ):
        raise ValidationFailed(
            "you cannot demote or deactivate yourself",
            errors=[{"field": "role" if role is not None else "is_active", "message": "self"}],
        )
    if role is not None:
        user.role = role
    if is_active is not None:
        user.is_active = is_active
    session.flush()
    return user
