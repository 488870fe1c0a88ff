"""Request and response bodies of sign-up, sign-in, users and API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, EmailStr, Field

from api.openapi import ObjectId
from conveyor.auth.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH
from conveyor.auth.roles import Role
from conveyor.models import ApiKey, User

Password = Field(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)


class Strict(BaseModel):
    """A request body that rejects unknown fields."""

    model_config = ConfigDict(extra="forbid")


class Register(Strict):
    """`POST /v1/auth/register`."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "email": "ada@example.com",
                "password": "correct horse battery",
                "tenant_name": "Acme",
            }
        }
    )

    email: EmailStr = Field(max_length=320)
    password: str = Password
    tenant_name: str = Field(min_length=1, max_length=200)


class Login(Strict):
    """`POST /v1/auth/login`."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {"email": "ada@example.com", "password": "correct horse battery"}
        }
    )

    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)


class Refresh(Strict):
    """`POST /v1/auth/refresh`."""

    model_config = ConfigDict(
        json_schema_extra={"example": {"refresh_token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9…"}}
    )

    refresh_token: str = Field(min_length=1, max_length=4096)


class NewUser(Strict):
    """`POST /v1/users`."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "email": "grace@example.com",
                "password": "a long passphrase",
                "role": "member",
            }
        }
    )

    email: EmailStr = Field(max_length=320)
    password: str = Password
    role: Role


class UserChange(Strict):
    """`PATCH /v1/users/{id}`."""

    model_config = ConfigDict(json_schema_extra={"example": {"role": "viewer"}})

    role: Role | None = None
    is_active: bool | None = None


class NewApiKey(Strict):
    """`POST /v1/api-keys`."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "name": "billing-service",
                "role": "member",
                "expires_at": "2027-01-01T00:00:00Z",
            }
        }
    )

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
    created_by_key_id: uuid.UUID | None = Field(
        description="The key that created this one, if a key did: revoking it revokes this one."
    )

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
            created_by_key_id=key.created_by_key_id,
        )


class CreatedApiKey(ApiKeyOut):
    """A new key, with its secret token shown this once."""

    key: str
    expiry_capped: bool = Field(
        description="A key made with a key never outlives it: true when `expires_at` is the "
        "creating key's expiry instead of the one asked for (or none)."
    )


class TenantOut(BaseModel):
    """A tenant."""

    id: uuid.UUID
    name: str


class Registered(BaseModel):
    """`POST /v1/auth/register`: the new tenant and its first user, an admin."""

    tenant: TenantOut
    user: UserOut


class Tokens(BaseModel):
    """An access token and the refresh token that renews it."""

    access_token: str
    refresh_token: str
    token_type: Literal["bearer"]
    expires_in: int = Field(description="seconds until the access token expires")


class Me(BaseModel):
    """`GET /v1/me`: who the caller is."""

    tenant_id: uuid.UUID
    role: Role
    user: UserOut | None
    api_key_id: uuid.UUID | None


class UserList(BaseModel):
    """`GET /v1/users`."""

    items: list[UserOut]


class ApiKeyList(BaseModel):
    """`GET /v1/api-keys`."""

    items: list[ApiKeyOut]


class UserPath(BaseModel):
    """A user's id in the path."""

    user_id: ObjectId


class KeyPath(BaseModel):
    """An API key's id in the path."""

    key_id: ObjectId
