"""Retention: old finished jobs, idempotency keys and refresh tokens, pruned in batches."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, tuple_

from conveyor.ledger.upkeep import delete_finished
from conveyor.ledger.work import UnitOfWork
from conveyor.models import IdempotencyKey, RefreshToken


def prune(
    unit: UnitOfWork,
    now: datetime,
    *,
    job_retention: timedelta,
    key_retention: timedelta,
    batch_size: int = 1000,
) -> dict[str, int]:
    """Delete one bounded batch of each kind of expired row; return how many of each."""
    old_keys = (
        select(IdempotencyKey.tenant_id, IdempotencyKey.key)
        .where(IdempotencyKey.created_at < now - key_retention)
        .limit(batch_size)
    )
    old_tokens = select(RefreshToken.id).where(RefreshToken.expires_at < now).limit(batch_size)
    key_columns = tuple_(IdempotencyKey.tenant_id, IdempotencyKey.key)
    jobs = delete_finished(unit, now - job_retention, batch_size=batch_size)
    statements = {
        "idempotency_keys": delete(IdempotencyKey).where(key_columns.in_(old_keys)),
        "refresh_tokens": delete(RefreshToken).where(RefreshToken.id.in_(old_tokens)),
    }
    return {"jobs": jobs} | {
        name: cast("CursorResult[Any]", unit.session.execute(statement)).rowcount
        for name, statement in statements.items()
    }
