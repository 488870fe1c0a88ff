"""The audit trail: who cancelled, retried, deleted or changed what, and when.

Kept in PostgreSQL in the same transaction as the change itself, so the record and the
change commit together (the history Flower forgets).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from conveyor.auth.keys import Principal
from conveyor.models import AuditEntry


def audit(
    session: Session,
    principal: Principal,
    action: str,
    target_type: str,
    target_id: uuid.UUID | str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record one action by `principal` on a target in its tenant."""
    session.add(
        AuditEntry(
            tenant_id=principal.tenant_id,
            actor_user_id=principal.user_id,
            actor_api_key_id=principal.api_key_id,
            action=action,
            target_type=target_type,
            target_id=str(target_id),
            detail=detail,
        )
    )


def list_audit(
    session: Session, tenant_id: uuid.UUID, *, limit: int = 100, before_id: int | None = None
) -> Sequence[AuditEntry]:
    """Return the tenant's audit entries, newest first, a page at a time."""
    query = select(AuditEntry).where(AuditEntry.tenant_id == tenant_id)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit)).all()
