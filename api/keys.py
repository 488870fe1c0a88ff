"""`/v1/api-keys`: keys for services; the secret is shown once."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response, jsonify

from api.auth import authorize
from api.identity_schemas import ApiKeyOut, CreatedApiKey, NewApiKey
from api.requests import parse_body, parse_id
from api.services import services
from conveyor.audit import audit
from conveyor.auth import create_api_key, list_api_keys, revoke_api_key
from conveyor.roles import Permission

bp = Blueprint("api_keys", __name__, url_prefix="/v1/api-keys")


@bp.post("")
def create() -> tuple[Response, int]:
    """Issue a key no more powerful than its creator."""
    principal = authorize(Permission.MANAGE_KEYS)
    body = parse_body(NewApiKey)
    svc = services()
    with svc.sessions.begin() as session:
        key, token = create_api_key(
            session,
            svc.settings.secret_key,
            principal,
            name=body.name,
            role=body.role,
            expires_at=body.expires_at,
            now=datetime.now(UTC),
        )
        audit(session, principal, "api_key.create", "api_key", key.id, {"role": body.role})
        out = CreatedApiKey(**ApiKeyOut.of(key).model_dump(), key=token)
    return jsonify(out.model_dump(mode="json")), 201


@bp.get("")
def index() -> Response:
    """List the tenant's live keys: prefix, role, created, last used, expiry."""
    principal = authorize(Permission.MANAGE_KEYS)
    with services().sessions() as session:
        keys = list_api_keys(session, principal.tenant_id)
        return jsonify(items=[ApiKeyOut.of(k).model_dump(mode="json") for k in keys])


@bp.delete("/<key_id>")
def revoke(key_id: str) -> tuple[str, int]:
    """Revoke a key at once."""
    principal = authorize(Permission.MANAGE_KEYS)
    svc = services()
    with svc.sessions.begin() as session:
        key = parse_id(key_id, "API key")
        revoke_api_key(session, principal.tenant_id, key, datetime.now(UTC))
        audit(session, principal, "api_key.revoke", "api_key", key)
    svc.key_cache.clear()
    return "", 204
