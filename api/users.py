"""`/v1/users`: a tenant's admins add, list, re-role and deactivate its users."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.auth import authorize
from api.identity_schemas import NewUser, UserChange, UserOut
from api.requests import parse_body, parse_id
from api.services import services
from conveyor.audit import audit
from conveyor.identity import add_user, list_users, update_user
from conveyor.roles import Permission

bp = Blueprint("users", __name__, url_prefix="/v1/users")


@bp.post("")
def create() -> tuple[Response, int]:
    """Add a user to the caller's tenant."""
    principal = authorize(Permission.MANAGE_USERS)
    body = parse_body(NewUser)
    with services().sessions.begin() as session:
        user = add_user(session, principal.tenant_id, body.email, body.password, body.role)
        audit(session, principal, "user.create", "user", user.id, {"role": body.role})
    return jsonify(UserOut.of(user).model_dump(mode="json")), 201


@bp.get("")
def index() -> Response:
    """List the caller's tenant's users."""
    principal = authorize(Permission.MANAGE_USERS)
    with services().sessions() as session:
        users = list_users(session, principal.tenant_id)
        return jsonify(items=[UserOut.of(u).model_dump(mode="json") for u in users])


@bp.patch("/<user_id>")
def change(user_id: str) -> Response:
    """Change a user's role, or deactivate or reactivate them."""
    principal = authorize(Permission.MANAGE_USERS)
    body = parse_body(UserChange)
    svc = services()
    with svc.sessions.begin() as session:
        user = update_user(
            session,
            principal.tenant_id,
            parse_id(user_id, "user"),
            acting_user_id=principal.user_id,
            role=body.role,
            is_active=body.is_active,
        )
        changed = body.model_dump(mode="json", exclude_unset=True)
        audit(session, principal, "user.change", "user", user.id, changed)
    # The user's API keys act at their current role and stop with them: forget them here.
    svc.key_cache.clear()
    return jsonify(UserOut.of(user).model_dump(mode="json"))
