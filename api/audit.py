"""`GET /v1/audit`: the tenant's audit trail, for admins."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field

from api.auth import authorize
from api.requests import parse_query
from api.services import services
from conveyor.audit import list_audit
from conveyor.roles import Permission

bp = Blueprint("audit", __name__)


class AuditQuery(BaseModel):
    """Paging of the audit trail."""

    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=100, ge=1, le=500)
    before_id: int | None = Field(default=None, ge=1)


@bp.get("/v1/audit")
def index() -> Response:
    """List who did what and when, newest first."""
    principal = authorize(Permission.SEE_AUDIT)
    query = parse_query(AuditQuery)
    with services().sessions() as session:
        entries = list_audit(
            session, principal.tenant_id, limit=query.limit, before_id=query.before_id
        )
        items = [
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
    return jsonify(items=items)
