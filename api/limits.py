"""Rate limits on sign-in and sign-up, per client IP and per email, counted in Redis."""

from __future__ import annotations

from flask import Blueprint, Flask, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from conveyor.identity import normalise_email
from conveyor.settings import Settings


def email_key() -> str:
    """Key a request by the email in its JSON body (or its IP when there is none)."""
    body = request.get_json(silent=True)
    email = body.get("email") if isinstance(body, dict) else None
    return f"email:{normalise_email(email)}" if isinstance(email, str) else get_remote_address()


def init_app(app: Flask, settings: Settings, throttled: Blueprint) -> None:
    """Limit every route of `throttled` by IP and by email; fail open when Redis is down."""
    limiter = Limiter(
        key_func=get_remote_address,
        app=app,
        storage_uri=settings.redis_url,
        storage_options={"socket_connect_timeout": 1, "socket_timeout": 1},
        key_prefix=settings.rate_limit_prefix,
        headers_enabled=True,
        # A Redis outage must not lock everyone out: log it and let the request through.
        swallow_errors=True,
    )
    limiter.limit(settings.auth_rate_limit_ip, key_func=get_remote_address)(throttled)
    limiter.limit(settings.auth_rate_limit_email, key_func=email_key)(throttled)
