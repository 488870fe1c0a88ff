"""Retention: old finished jobs, idempotency keys and refresh tokens, pruned in batches."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, tuple_
from sqlalchemy.orm import Session

from conveyor.models import IdempotencyKey, Job, RefreshToken
from conveyor.snapshots import GONE, Snapshot, note


def prune(
    session: Session,
    now: datetime,
    *,
    job_retention: timedelta,
    key_retention: timedelta,
    batch_size: int = 1000,
) -> dict[str, int]:
    """Delete one bounded batch of each kind of expired row; return how many of each."""
    old_jobs = (
        select(Job.id)
        .where(Job.finished_at < now - job_retention)
        .order_by(Job.finished_at)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    )
    old_keys = (
        select(IdempotencyKey.tenant_id, IdempotencyKey.key)
        .where(IdempotencyKey.created_at < now - key_retention)
        .limit(batch_size)
    )
    old_tokens = select(RefreshToken.id).where(RefreshToken.expires_at < now).limit(batch_size)
    key_columns = tuple_(IdempotencyKey.tenant_id, IdempotencyKey.key)
    # Job events go with their job (ON DELETE CASCADE).
    pruned = session.scalars(delete(Job).where(Job.id.in_(old_jobs)).returning(Job.id)).all()
    # A pruned job is gone for good: no snapshot may show it again.
    note(session, [Snapshot(job_id, GONE) for job_id in pruned])
    statements = {
        "idempotency_keys": delete(IdempotencyKey).where(key_columns.in_(old_keys)),
        "refresh_tokens": delete(RefreshToken).where(RefreshToken.id.in_(old_tokens)),
    }
    return {"jobs": len(pruned)} | {
        name: cast("CursorResult[Any]", session.execute(statement)).rowcount
        for name, statement in statements.items()
    }
