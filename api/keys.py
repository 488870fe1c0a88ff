"""`/v1/api-keys`: keys for services; the secret is shown once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from flask import Response, jsonify

from api.auth import current_principal, requires
from api.identity_schemas import ApiKeyList, ApiKeyOut, CreatedApiKey, KeyPath, NewApiKey
from api.openapi import JSON_BODY, empty, responses, secured_blueprint
from api.requests import parse_id
from api.services import services
from conveyor.audit import audit
from conveyor.auth.keys import create_api_key, list_api_keys, revoke_api_key
from conveyor.auth.roles import Permission

bp = secured_blueprint("api_keys", __name__, "api-keys", "/v1/api-keys")


def issue_key(body: NewApiKey) -> CreatedApiKey:
    """Issue the caller a key no more powerful than itself, audited; its secret shown once."""
    principal = current_principal()
    svc = services()
    with svc.sessions.begin() as session:
        key, token = create_api_key(
            session,
            svc.settings.secret_key.get_secret_value(),
            principal,
            name=body.name,
            role=body.role,
            expires_at=body.expires_at,
            now=datetime.now(UTC),
        )
        audit(session, principal, "api_key.create", "api_key", key.id, {"role": body.role})
        capped = key.expires_at != body.expires_at
        return CreatedApiKey(**ApiKeyOut.of(key).model_dump(), key=token, expiry_capped=capped)


def live_keys() -> list[ApiKeyOut]:
    """Return the caller's tenant's live keys."""
    with services().sessions() as session:
        return [ApiKeyOut.of(k) for k in list_api_keys(session, current_principal().tenant_id)]


def revoke_key(key: uuid.UUID) -> None:
    """Revoke a key and every key it created, audited; never a key above the caller's role."""
    principal = current_principal()
    svc = services()
    with svc.sessions.begin() as session:
        for revoked in revoke_api_key(session, principal, key, datetime.now(UTC)):
            cascade = revoked.cascade_from
            detail = None if cascade is None else {"cascade_from": str(cascade)}
            audit(session, principal, "api_key.revoke", "api_key", revoked.id, detail)
    svc.key_cache.clear()


@bp.post("", responses=responses({201: CreatedApiKey}, *JSON_BODY))
@requires(Permission.MANAGE_KEYS)
def create(body: NewApiKey) -> tuple[Response, int]:
    """Issue a key no more powerful than its creator."""
    return jsonify(issue_key(body).model_dump(mode="json")), 201


@bp.get("", responses=responses({200: ApiKeyList}))
@requires(Permission.MANAGE_KEYS)
def index() -> Response:
    """List the tenant's live keys: prefix, role, created, last used, expiry."""
    return jsonify(items=[key.model_dump(mode="json") for key in live_keys()])


@bp.delete("/<key_id>", responses=responses({204: empty("Revoked.")}, 404))
@requires(Permission.MANAGE_KEYS)
def revoke(path: KeyPath) -> tuple[str, int]:
    """Revoke a key, and every key it created, at once; never a key above your own role."""
    revoke_key(parse_id(path.key_id, "API key"))
    return "", 204
