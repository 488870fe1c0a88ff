"""Sign-up, sign-in, tokens and the caller's own identity: `/v1/auth/*` and `/v1/me`."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Response, jsonify
from flask_openapi3.blueprint import APIBlueprint

from api.auth import current_principal, decode, issue_tokens, requires
from api.identity_schemas import Login, Me, Refresh, Register, Registered, Tokens, UserOut
from api.openapi import AUTHENTICATED, BEARER, JSON_BODY, empty, responses, tag
from api.services import services
from conveyor.auth.identity import check_credentials, get_user, register_tenant
from conveyor.auth.tokens import active_user_for_token, revoke_family, use_refresh_token
from conveyor.errors import Forbidden, Unauthorized, ValidationFailed

AUTH_TAG = tag("auth")
# Sign-in and sign-up are rate limited as a whole blueprint (api/rate_limits.py).
signin = APIBlueprint(
    "signin",
    __name__,
    url_prefix="/v1/auth",
    abp_tags=AUTH_TAG,
    abp_responses=responses({}, 429, 503),
)
bp = APIBlueprint("identity", __name__, abp_tags=AUTH_TAG)


@signin.post("/register", responses=responses({201: Registered}, 403, 409, *JSON_BODY))
def register(body: Register) -> tuple[Response, int]:
    """Create a tenant and its first user, an admin (when sign-up is open)."""
    svc = services()
    if not svc.settings.signup_open:
        raise Forbidden("sign-up is by invitation: ask a tenant admin to add you")
    with svc.sessions.begin() as session:
        tenant, user = register_tenant(session, body.tenant_name, body.email, body.password)
    return jsonify(
        tenant={"id": str(tenant.id), "name": tenant.name},
        user=UserOut.of(user).model_dump(mode="json"),
    ), 201


@signin.post("/login", responses=responses({200: Tokens}, 401, *JSON_BODY))
def login(body: Login) -> Response:
    """Exchange an email and password for an access token and a refresh token."""
    with services().sessions.begin() as session:
        user = check_credentials(session, body.email, body.password)
        return jsonify(issue_tokens(session, user))


@bp.post("/v1/auth/refresh", responses=responses({200: Tokens}, 401, 503, *JSON_BODY))
def refresh(body: Refresh) -> Response:
    """Rotate a refresh token; presenting a spent one revokes its whole family."""
    claims = decode(body.refresh_token, "refresh")
    svc = services()
    with svc.sessions.begin() as session:
        spent = use_refresh_token(session, claims["jti"], datetime.now(UTC))
        user = spent and active_user_for_token(session, spent.user_id, spent.family_id)
        tokens = issue_tokens(session, user, spent.family_id) if spent and user else None
    # Committed first: a detected reuse must stay revoked even though this request fails.
    if tokens is None:
        raise Unauthorized("the refresh token was already used or revoked")
    return jsonify(tokens)


@bp.post(
    "/v1/auth/logout",
    security=BEARER,
    responses=responses({204: empty("Signed out.")}, 422, *AUTHENTICATED),
)
@requires()
def logout() -> tuple[str, int]:
    """Revoke the caller's login: its refresh tokens and its access tokens, at once."""
    principal = current_principal()
    if principal.token_family is None:
        raise ValidationFailed(
            "API keys are revoked with DELETE /v1/api-keys/{id}",
            errors=[{"field": "Authorization", "message": "an access token is required"}],
        )
    with services().sessions.begin() as session:
        revoke_family(session, principal.token_family, datetime.now(UTC))
    return "", 204


@bp.get("/v1/me", security=BEARER, responses=responses({200: Me}, *AUTHENTICATED))
@requires()
def me() -> Response:
    """Describe the caller: tenant, role, and the user or key behind the request."""
    principal = current_principal()
    user = None
    if principal.user_id is not None:
        with services().sessions() as session:
            user = UserOut.of(get_user(session, principal.tenant_id, principal.user_id))
    return jsonify(
        tenant_id=str(principal.tenant_id),
        role=principal.role,
        user=user.model_dump(mode="json") if user else None,
        api_key_id=str(principal.api_key_id) if principal.api_key_id else None,
    )
