"""Credentials: API keys of the form `cvk_<prefix>_<secret>`, checked against a keyed hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from conveyor.errors import Unauthorized
from conveyor.models import ApiKey

KEY_SCHEME = "cvk"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant they act for and their role."""

    tenant_id: uuid.UUID
    role: str
    api_key_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None


@dataclass(frozen=True)
class NewApiKey:
    """A freshly generated key: the full token is shown once, only the hash is stored."""

    prefix: str
    token: str
    secret_hash: str


def hash_secret(signing_key: str, secret: str) -> str:
    """Hash a high-entropy key secret with HMAC-SHA256; no slow password hash is needed."""
    return hmac.new(signing_key.encode(), secret.encode(), hashlib.sha256).hexdigest()


def generate_api_key(signing_key: str) -> NewApiKey:
    """Make a new random key with a public lookup prefix and a 256-bit secret."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return NewApiKey(prefix, f"{KEY_SCHEME}_{prefix}_{secret}", hash_secret(signing_key, secret))


def authenticate_api_key(
    session: Session, signing_key: str, token: str, now: datetime
) -> Principal:
    """Return the principal a key token stands for, or raise `Unauthorized`."""
    scheme, _, rest = token.partition("_")
    prefix, _, secret = rest.partition("_")
    if scheme != KEY_SCHEME or not prefix or not secret:
        raise Unauthorized("the API key is malformed")
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    # Compare even when no key matched, so timing does not reveal which prefixes exist.
    stored = key.secret_hash if key is not None else "0" * 64
    if not hmac.compare_digest(stored, hash_secret(signing_key, secret)) or key is None:
        raise Unauthorized("the API key is not valid")
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
        raise Unauthorized("the API key is revoked or expired")
    return Principal(tenant_id=key.tenant_id, role=key.role, api_key_id=key.id)
