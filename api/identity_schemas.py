"""Request and response bodies of sign-up, sign-in, users and API keys."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, EmailStr, Field

from conveyor.models import ApiKey, User
from conveyor.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH
from conveyor.roles import Role

Password = Field(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)


class Strict(BaseModel):
    """A request body that rejects unknown fields."""

    model_config = ConfigDict(extra="forbid")


class Register(Strict):
    """`POST /v1/auth/register`."""

    email: EmailStr = Field(max_length=320)
    password: str = Password
    tenant_name: str = Field(min_length=1, max_length=200)


class Login(Strict):
    """`POST /v1/auth/login`."""

    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)


class Refresh(Strict):
    """`POST /v1/auth/refresh`."""

    refresh_token: str = Field(min_length=1, max_length=4096)


class NewUser(Strict):
    """`POST /v1/users`."""

    email: EmailStr = Field(max_length=320)
    password: str = Password
    role: Role


class UserChange(Strict):
    """`PATCH /v1/users/{id}`."""

    role: Role | None = None
    is_active: bool | None = None


class NewApiKey(Strict):
    """`POST /v1/api-keys`."""

    name: str = Field(min_length=1, max_length=200)
    role: Role
    expires_at: AwareDatetime | None = None


class UserOut(BaseModel):
    """A user as their tenant's admins and they themselves see them."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    email: str
    role: Role
    is_active: bool
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        """Build from a row."""
        return cls(
            id=user.id,
            tenant_id=user.tenant_id,
            email=user.email,
            role=Role(user.role),
            is_active=user.is_active,
            created_at=user.created_at,
        )


class ApiKeyOut(BaseModel):
    """A key's public facts; the secret is never shown again."""

    id: uuid.UUID
    name: str
    prefix: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyOut:
        """Build from a row."""
        return cls(
            id=key.id,
            name=key.name,
            prefix=key.prefix,
            role=Role(key.role),
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            expires_at=key.expires_at,
        )


class CreatedApiKey(ApiKeyOut):
    """A new key, with its secret token shown this once."""

    key: str
