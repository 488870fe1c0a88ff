"""Idempotency keys: one request, replayed, answers with the job it created the first time."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from conveyor.errors import Conflict
from conveyor.ledger.work import UnitOfWork
from conveyor.models import IdempotencyKey


def claim_idempotency_key(
    unit: UnitOfWork,
    tenant_id: uuid.UUID,
    key: str,
    fingerprint: str,
    job_id: uuid.UUID,
    *,
    now: datetime,
    retention: timedelta,
) -> uuid.UUID | None:
    """Claim `key` for a new job, or return the job an earlier identical request created.

    Concurrent claims of one key serialise on its primary key: the loser waits for the
    winner's commit and then sees its row. A key older than `retention` is reused.
    A different request under a live key is a `Conflict`.
    """
    claimed = unit.session.execute(
        pg_insert(IdempotencyKey)
        .values(
            tenant_id=tenant_id, key=key, request_hash=fingerprint, job_id=job_id, created_at=now
        )
        .on_conflict_do_update(
            index_elements=[IdempotencyKey.tenant_id, IdempotencyKey.key],
            set_={"request_hash": fingerprint, "job_id": job_id, "created_at": now},
            where=IdempotencyKey.created_at < now - retention,
        )
        .returning(IdempotencyKey.job_id)
    ).scalar_one_or_none()
    if claimed is not None:
        return None
    existing = unit.session.execute(
        select(IdempotencyKey.request_hash, IdempotencyKey.job_id).where(
            IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key
        )
    ).one()
    if existing.request_hash != fingerprint:
        raise Conflict(
            "this Idempotency-Key was used for a different request",
            errors=[{"field": "Idempotency-Key", "message": "reused with another request"}],
        )
    existing_job: uuid.UUID = existing.job_id
    return existing_job


def point_idempotency_key(
    unit: UnitOfWork, tenant_id: uuid.UUID, key: str, job_id: uuid.UUID
) -> None:
    """Make an Idempotency-Key just claimed name another job (the one its unique key found)."""
    unit.session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
        .values(job_id=job_id)
    )
