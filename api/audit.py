"""`GET /v1/audit`: the tenant's audit trail, for admins."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from flask import Response, jsonify
from pydantic import BaseModel, ConfigDict, Field

from api.auth import current_principal, requires
from api.openapi import QueryModel, responses, secured_blueprint
from api.services import services
from conveyor.audit import list_audit
from conveyor.auth.roles import Permission

bp = secured_blueprint("audit", __name__, "audit")


class AuditQuery(QueryModel):
    """Paging of the audit trail."""

    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=100, ge=1, le=500)
    before_id: int | None = Field(default=None, ge=1)


class AuditEntryOut(BaseModel):
    """One audited action."""

    id: int
    at: datetime
    actor_user_id: uuid.UUID | None
    actor_api_key_id: uuid.UUID | None
    action: str
    target_type: str
    target_id: str
    detail: dict[str, Any] | None


class AuditList(BaseModel):
    """`GET /v1/audit`."""

    items: list[AuditEntryOut]


@bp.get("/v1/audit", responses=responses({200: AuditList}, 422))
@requires(Permission.SEE_AUDIT)
def index(query: AuditQuery) -> Response:
    """List who did what and when, newest first."""
    return jsonify(items=audit_items(query.limit, query.before_id))


def audit_items(limit: int, before_id: int | None = None) -> list[dict[str, Any]]:
    """Return the caller's tenant's audit entries, newest first, as JSON-ready dicts."""
    principal = current_principal()
    with services().sessions() as session:
        entries = list_audit(session, principal.tenant_id, limit=limit, before_id=before_id)
        return [
            {
                "id": e.id,
                "at": e.created_at.isoformat(),
                "actor_user_id": str(e.actor_user_id) if e.actor_user_id else None,
                "actor_api_key_id": str(e.actor_api_key_id) if e.actor_api_key_id else None,
                "action": e.action,
                "target_type": e.target_type,
                "target_id": e.target_id,
                "detail": e.detail,
            }
            for e in entries
        ]
