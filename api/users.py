"""`/v1/users`: a tenant's admins add, list, re-role and deactivate its users."""

from __future__ import annotations

from flask import Response, jsonify

from api.auth import current_principal, requires
from api.identity_schemas import NewUser, UserChange, UserList, UserOut, UserPath
from api.openapi import JSON_BODY, responses, secured_blueprint
from api.requests import parse_id
from api.services import services
from conveyor.audit import audit
from conveyor.auth.identity import add_user, list_users, update_user
from conveyor.auth.roles import Permission

bp = secured_blueprint("users", __name__, "users", "/v1/users")


@bp.post("", responses=responses({201: UserOut}, 409, *JSON_BODY))
@requires(Permission.MANAGE_USERS)
def create(body: NewUser) -> tuple[Response, int]:
    """Add a user to the caller's tenant."""
    principal = current_principal()
    with services().sessions.begin() as session:
        user = add_user(session, principal.tenant_id, body.email, body.password, body.role)
        audit(session, principal, "user.create", "user", user.id, {"role": body.role})
    return jsonify(UserOut.of(user).model_dump(mode="json")), 201


@bp.get("", responses=responses({200: UserList}))
@requires(Permission.MANAGE_USERS)
def index() -> Response:
    """List the caller's tenant's users."""
    principal = current_principal()
    with services().sessions() as session:
        users = list_users(session, principal.tenant_id)
        return jsonify(items=[UserOut.of(u).model_dump(mode="json") for u in users])


@bp.patch("/<user_id>", responses=responses({200: UserOut}, 404, 409, *JSON_BODY))
@requires(Permission.MANAGE_USERS)
def change(path: UserPath, body: UserChange) -> Response:
    """Change a user's role, or deactivate or reactivate them."""
    principal = current_principal()
    svc = services()
    with svc.sessions.begin() as session:
        user = update_user(
            session,
            principal.tenant_id,
            parse_id(path.user_id, "user"),
            acting_user_id=principal.user_id,
            role=body.role,
            is_active=body.is_active,
        )
        changed = body.model_dump(mode="json", exclude_unset=True)
        audit(session, principal, "user.change", "user", user.id, changed)
    # The user's API keys act at their current role and stop with them: forget them here.
    svc.key_cache.clear()
    return jsonify(UserOut.of(user).model_dump(mode="json"))
