"""Who is calling: `Authorization: Bearer <access token or API key>` becomes a Principal."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import jwt
from flask import Flask, current_app, g, request
from flask_jwt_extended import JWTManager, create_access_token, create_refresh_token, decode_token
from sqlalchemy.orm import Session

from api.services import services
from conveyor.auth.keys import KEY_SCHEME, Principal, authenticate_api_key
from conveyor.auth.roles import Permission, Role, check_permission
from conveyor.auth.tokens import active_user_for_token, record_refresh_token
from conveyor.errors import Unauthorized
from conveyor.models import User
from conveyor.settings import Settings
from conveyor.telemetry.logs import bind_context

# Marks a view that needs a caller but no particular permission.
ANY_CALLER = "any-caller"
# Claims every token we issue carries; a token without one was not made by us.
REQUIRED_CLAIMS = ["exp", "iat", "jti", "type", "sub"]
_REQUIRED = "conveyor_requires"
V = TypeVar("V", bound=Callable[..., Any])


def requires(permission: Permission | None = None) -> Callable[[V], V]:
    """Mark a view as needing a caller (holding `permission`), checked before its input."""

    def mark(view: V) -> V:
        # Set before flask-openapi3 wraps the view: its wrapper copies the attribute.
        setattr(view, _REQUIRED, permission or ANY_CALLER)
        return view

    return mark


def current_principal() -> Principal:
    """Return the caller of a view marked with `requires`."""
    if "principal" not in g:
        raise RuntimeError(f"{request.endpoint} reads the caller but is not marked @requires")
    principal: Principal = g.principal
    return principal


def init_app(app: Flask, settings: Settings) -> None:
    """Configure JWTs (HS256, short access tokens) and check callers before anything else."""
    app.config.update(
        JWT_SECRET_KEY=settings.secret_key.get_secret_value(),
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=["HS256"],
        JWT_ACCESS_TOKEN_EXPIRES=timedelta(minutes=settings.access_token_minutes),
        JWT_REFRESH_TOKEN_EXPIRES=timedelta(days=settings.refresh_token_days),
        JWT_TOKEN_LOCATION=["headers"],
    )
    JWTManager(app)

    @app.before_request
    def _authorize() -> None:
        # Before the body or query is validated: a stranger learns nothing but 401/403.
        view = app.view_functions.get(request.endpoint or "")
        needed = getattr(view, _REQUIRED, None)
        if needed is None or request.method == "OPTIONS":
            return
        principal = authenticate()
        if needed != ANY_CALLER:
            check_permission(principal.role, needed)


def decode(token: str, expected_type: str) -> dict[str, Any]:
    """Verify a JWT's signature, expiry, claims and type, or raise `Unauthorized`."""
    config = current_app.config
    try:
        # PyJWT itself: flask-jwt-extended's decode_token fills in a missing `type`
        # ("access") and `jti`, so a token lacking them would pass it.
        claims: dict[str, Any] = jwt.decode(
            token,
            config["JWT_SECRET_KEY"],
            algorithms=config["JWT_DECODE_ALGORITHMS"],
            options={"require": REQUIRED_CLAIMS},
        )
    except (jwt.PyJWTError, ValueError) as exc:
        raise Unauthorized("the token is invalid or expired") from exc
    if claims.get("type") != expected_type:
        raise Unauthorized(f"an {expected_type} token is required")
    return claims


def issue_tokens(
    session: Session, user: User, family_id: uuid.UUID | None = None
) -> dict[str, Any]:
    """Issue an access token and a refresh token of one family (a new family per login)."""
    family = family_id or uuid.uuid4()
    claims = {"tid": str(user.tenant_id), "fam": str(family)}
    access = create_access_token(identity=str(user.id), additional_claims=claims)
    refresh = create_refresh_token(identity=str(user.id), additional_claims=claims)
    refresh_claims = decode_token(refresh)
    record_refresh_token(
        session,
        user.id,
        family,
        refresh_claims["jti"],
        datetime.fromtimestamp(refresh_claims["exp"], UTC),
    )
    lifetime = services().settings.access_token_minutes * 60
    return {
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "bearer",
        "expires_in": lifetime,
    }


def _principal_from_jwt(session: Session, token: str) -> Principal:
    claims = decode(token, "access")
    try:
        user_id, family = uuid.UUID(claims["sub"]), uuid.UUID(claims["fam"])
    except (KeyError, ValueError, TypeError) as exc:
        raise Unauthorized("the token is invalid or expired") from exc
    # Role and activity come from the database, so a demotion or deactivation bites at once.
    user = active_user_for_token(session, user_id, family)
    if user is None:
        raise Unauthorized("the token is revoked or its user deactivated")
    return Principal(
        tenant_id=user.tenant_id, role=Role(user.role), user_id=user.id, token_family=family
    )


def authenticate() -> Principal:
    """Return the caller's principal, once per request, or raise `Unauthorized`."""
    if "principal" in g:
        found: Principal = g.principal
        return found
    if "auth_failure" in g:
        # Refused once already (the rate limiter authenticates first): no second lookup.
        raise Unauthorized(g.auth_failure)
    try:
        return _authenticate()
    except Unauthorized as exc:
        g.auth_failure = exc.detail
        raise


def cached_principal() -> Principal | None:
    """Return the caller if known without a lookup: verified already, or a cached API key.

    The rate limiter counts such a caller's principal together with its IP, in one round
    trip; anyone else is authenticated only after the IP was counted.
    """
    if "principal" in g:
        found: Principal = g.principal
        return found
    token = _bearer_token()
    if token is None or not token.startswith(f"{KEY_SCHEME}_"):
        return None
    cached = services().key_cache.get(token, datetime.now(UTC))
    if cached is not None:
        g.principal = cached
    return cached


def _bearer_token() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _authenticate() -> Principal:
    cached = cached_principal()
    if cached is not None:
        return cached
    token = _bearer_token()
    if token is None:
        raise Unauthorized("send 'Authorization: Bearer <access token or API key>'")
    svc = services()
    is_key = token.startswith(f"{KEY_SCHEME}_")
    now = datetime.now(UTC)
    with svc.sessions.begin() as session:
        if is_key:
            principal = authenticate_api_key(
                session, svc.settings.secret_key.get_secret_value(), token, now
            )
        else:
            principal = _principal_from_jwt(session, token)
    if is_key:
        svc.key_cache.put(token, principal)
    g.principal = principal
    bind_context(tenant_id=principal.tenant_id)
    return principal
