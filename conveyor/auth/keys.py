"""Credentials: API keys of the form `cvk_<prefix>_<secret>`, checked against a keyed hash."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from conveyor.auth.roles import Role, check_grant
from conveyor.errors import NotFound, Unauthorized, ValidationFailed
from conveyor.models import ApiKey, User

KEY_SCHEME = "cvk"
_PREFIX = re.compile(r"[0-9a-f]{12}")
# `secrets.token_urlsafe` text; anything else in a header is refused before any lookup.
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
# `last_used_at` is written at most this often per key, so reads stay reads.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant they act for, their role, and the person behind them."""

    tenant_id: uuid.UUID
    role: Role
    user_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    token_family: uuid.UUID | None = None
    # When the credential itself stops being valid (an API key's expiry).
    expires_at: datetime | None = None


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
    """Return the principal a key token stands for, or raise `Unauthorized`.

    A key never acts above its creator's current role, and stops with its creator.
    """
    scheme, _, rest = token.partition("_")
    prefix, _, secret = rest.partition("_")
    if scheme != KEY_SCHEME or not _PREFIX.fullmatch(prefix) or not _SECRET.fullmatch(secret):
        raise Unauthorized("the API key is malformed")
    row = session.execute(
        select(ApiKey, User.role, User.is_active)
        .outerjoin(User, User.id == ApiKey.created_by)
        .where(ApiKey.prefix == prefix)
    ).one_or_none()
    # Compare even when no key matched, so timing does not reveal which prefixes exist.
    stored = row.ApiKey.secret_hash if row is not None else "0" * 64
    if not hmac.compare_digest(stored, hash_secret(signing_key, secret)) or row is None:
        raise Unauthorized("the API key is not valid")
    key: ApiKey = row.ApiKey
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
        raise Unauthorized("the API key is revoked or expired")
    role = Role(key.role)
    if key.created_by is not None:
        if not row.is_active:
            raise Unauthorized("the API key's creator is deactivated")
        role = min(role, Role(row.role), key=lambda r: r.rank)
    if key.last_used_at is None or key.last_used_at <= now - LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return Principal(
        tenant_id=key.tenant_id,
        role=role,
        user_id=key.created_by,
        api_key_id=key.id,
        expires_at=key.expires_at,
    )


class PrincipalCache:
    """Remember for a few seconds, in one process, which principal an API key token stands for.

    A busy client sends the same key on every request; this spares each request the key
    lookup (a pooled-connection checkout, a SELECT and a COMMIT). Revoking a key,
    deactivating or demoting its creator reaches this process at once (`clear`) and every
    other API process within `ttl` seconds. A key's own expiry is never outlived.
    """

    def __init__(
        self, ttl: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[bytes, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _slot(token: str) -> bytes:
        # Keyed by a digest, so the cache never holds a usable secret.
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def get(self, token: str, now: datetime) -> Principal | None:
        """Return the cached principal of `token` while it is fresh and its key unexpired."""
        if self._ttl <= 0:
            return None
        slot = self._slot(token)
        with self._lock:
            entry = self._entries.get(slot)
        if entry is None:
            return None
        fresh_until, principal = entry
        expired = principal.expires_at is not None and principal.expires_at <= now
        if fresh_until <= self._clock() or expired:
            with self._lock:
                self._entries.pop(slot, None)
            return None
        return principal

    def put(self, token: str, principal: Principal) -> None:
        """Remember that `token` (already verified) stands for `principal`."""
        if self._ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()  # a flood of distinct keys: start over, stay bounded
            self._entries[self._slot(token)] = (self._clock() + self._ttl, principal)

    def clear(self) -> None:
        """Forget every key: something about keys or users changed."""
        with self._lock:
            self._entries.clear()


def create_api_key(
    session: Session,
    signing_key: str,
    creator: Principal,
    *,
    name: str,
    role: Role,
    expires_at: datetime | None,
    now: datetime,
) -> tuple[ApiKey, str]:
    """Issue a key in the creator's tenant, never above the creator's role, with its token.

    A key made by a key never outlives it: its expiry is capped at its creator's.
    """
    check_grant(creator.role, role)
    if expires_at is not None and expires_at <= now:
        raise ValidationFailed(
            "the expiry is in the past", errors=[{"field": "expires_at", "message": "in the past"}]
        )
    if creator.api_key_id is not None:
        _lock_live_key(session, creator.api_key_id)
        limit = creator.expires_at
        if limit is not None and (expires_at is None or expires_at > limit):
            expires_at = limit
    new_key = generate_api_key(signing_key)
    key = ApiKey(
        tenant_id=creator.tenant_id,
        created_by=creator.user_id,
        created_by_key_id=creator.api_key_id,
        name=name,
        prefix=new_key.prefix,
        secret_hash=new_key.secret_hash,
        role=role,
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    return key, new_key.token


def _lock_live_key(session: Session, key_id: uuid.UUID) -> None:
    """Hold a creating key against revocation until commit, or raise if it is revoked already.

    The share lock and revocation's update lock exclude each other: either the revocation
    waits and then finds the new key in the lineage, or the creation waits and is refused.
    It also refuses a key another API process still trusts from its cache.
    """
    row = session.execute(
        select(ApiKey.revoked_at).where(ApiKey.id == key_id).with_for_update(read=True)
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("the API key is revoked or expired")


def list_api_keys(session: Session, tenant_id: uuid.UUID) -> Sequence[ApiKey]:
    """Return the tenant's keys that are not revoked, newest first."""
    return session.scalars(
        select(ApiKey)
        .where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at.desc(), ApiKey.id)
    ).all()


@dataclass(frozen=True)
class RevokedKey:
    """A key `revoke_api_key` revoked: the one asked for, or one its lineage created."""

    id: uuid.UUID
    # The key that created this one, when it was revoked along with it.
    cascade_from: uuid.UUID | None


def revoke_api_key(
    session: Session, revoker: Principal, key_id: uuid.UUID, now: datetime
) -> list[RevokedKey]:
    """Revoke a key and every key it created (transitively) at once, the asked-for one first.

    Another tenant's key is `NotFound`; a key whose role ranks above the revoker's is
    `Forbidden`, by the rule that keeps a creator from granting it.
    """
    role = session.scalar(
        select(ApiKey.role)
        .where(
            ApiKey.id == key_id,
            ApiKey.tenant_id == revoker.tenant_id,
            ApiKey.revoked_at.is_(None),
        )
        .with_for_update()
    )
    if role is None:
        raise NotFound(f"there is no API key {key_id}")
    check_grant(revoker.role, role, action="revoke")
    lineage = select(ApiKey.id).where(ApiKey.id == key_id).cte("lineage", recursive=True)
    # UNION, not UNION ALL: it stops at a key already seen, whatever the data holds.
    lineage = lineage.union(
        select(ApiKey.id).join(lineage, ApiKey.created_by_key_id == lineage.c.id)
    )
    rows = session.execute(
        update(ApiKey)
        .where(ApiKey.id.in_(select(lineage.c.id)), ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(ApiKey.id, ApiKey.created_by_key_id)
        .execution_options(synchronize_session=False)
    ).all()
    revoked = [
        RevokedKey(row.id, None if row.id == key_id else row.created_by_key_id) for row in rows
    ]
    return sorted(revoked, key=lambda key: key.cascade_from is not None)
