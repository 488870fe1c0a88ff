"""Refresh-token families: rotation, reuse detection and revocation, stored hashed."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from conveyor.models import RefreshToken, User


def token_hash(jti: str) -> str:
    """Return the stored form of a token id."""
    return hashlib.sha256(jti.encode()).hexdigest()


def record_refresh_token(
    session: Session, user_id: uuid.UUID, family_id: uuid.UUID, jti: str, expires_at: datetime
) -> None:
    """Remember an issued refresh token so it can be used exactly once."""
    session.add(
        RefreshToken(
            user_id=user_id, family_id=family_id, token_hash=token_hash(jti), expires_at=expires_at
        )
    )
    session.flush()


def use_refresh_token(session: Session, jti: str, now: datetime) -> RefreshToken | None:
    """Spend a refresh token; a second use revokes its whole family and returns `None`.

    The caller must commit even when this returns `None`, so the revocation sticks.
    """
    spent = session.execute(
        update(RefreshToken)
        .where(
            RefreshToken.token_hash == token_hash(jti),
            RefreshToken.used_at.is_(None),
            RefreshToken.revoked_at.is_(None),
        )
        .values(used_at=now)
        .returning(RefreshToken)
    ).scalar_one_or_none()
    if spent is not None:
        return spent
    reused = session.scalar(select(RefreshToken).where(RefreshToken.token_hash == token_hash(jti)))
    if reused is not None:
        revoke_family(session, reused.family_id, now)
    return None


def revoke_family(session: Session, family_id: uuid.UUID, now: datetime) -> None:
    """Revoke every token of a login: its refresh tokens and the access tokens that cite it."""
    session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )


def active_user_for_token(
    session: Session, user_id: uuid.UUID, family_id: uuid.UUID
) -> User | None:
    """Return the token's user if still active and its family not revoked (one query)."""
    revoked = exists().where(
        RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_not(None)
    )
    return session.scalar(
        select(User).where(User.id == user_id, User.is_active.is_(True), ~revoked)
    )
