"""Who is calling. The seam the identity issue replaces: `authenticate()` returns a Principal."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import g, request

from api.services import services
from conveyor.auth import Principal, authenticate_api_key
from conveyor.errors import Unauthorized


def authenticate() -> Principal:
    """Return the caller's principal from `Authorization: Bearer <API key>`, once per request."""
    if "principal" in g:
        found: Principal = g.principal
        return found
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send 'Authorization: Bearer <API key>'")
    svc = services()
    with svc.sessions() as session:
        principal = authenticate_api_key(
            session, svc.settings.secret_key, token.strip(), datetime.now(UTC)
        )
    g.principal = principal
    return principal
