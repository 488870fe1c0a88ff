"""The operator console at `/console/`: server-rendered pages over the API's own functions.

Jinja templates and a little plain JavaScript (static/console.js, for the refresh), all in
this package: nothing is fetched from elsewhere, so it works offline. Who may see and do
what is the API's permission table; another tenant's object is a 404 page.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from datetime import timedelta

from flask import Flask, redirect, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from api.console import (  # noqa: F401 - their views join the blueprint
    events,
    jobs,
    operations,
    signin,
    workflows,
)
from api.console.base import bp, render
from api.errors import problem_type
from api.requests import request_id
from conveyor.errors import ConveyorError, RateLimited, ServiceUnavailable, Unauthorized
from conveyor.settings import Settings

logger = logging.getLogger(__name__)
SESSION_COOKIE = "conveyor_console"
# The console's sign-in form shares the API's login windows (api/rate_limits.py).
SIGN_IN_FORMS = {"console.sign_in": "signin.login"}


def session_key(settings: Settings) -> bytes:
    """Derive the key that signs console cookies from the secret key, for this use only."""
    secret = settings.secret_key.get_secret_value().encode()
    return hmac.new(secret, b"conveyor console session", hashlib.sha256).digest()


def init_app(app: Flask, settings: Settings) -> None:
    """Serve the console: its cookie (HttpOnly, SameSite=Strict, Secure outside development)."""
    app.secret_key = session_key(settings)
    app.config.update(
        SESSION_COOKIE_NAME=SESSION_COOKIE,
        SESSION_COOKIE_PATH="/console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.env != "development",
        PERMANENT_SESSION_LIFETIME=timedelta(days=settings.refresh_token_days),
    )
    app.register_blueprint(bp)


@bp.after_request
def _private(response: Response) -> Response:
    # Every console page depends on who is signed in: never in a shared cache.
    response.headers["Cache-Control"] = "no-store"
    if request.endpoint != "console.static":
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        )
    return response


@bp.errorhandler(ConveyorError)
def _conveyor_error(exc: ConveyorError) -> Response | tuple[str, int]:
    if isinstance(exc, Unauthorized):
        return redirect(url_for("console.sign_in"))
    kind = problem_type(type(exc))
    if kind.status >= 500:
        logger.error("request %s failed: %s", request_id(), exc, exc_info=exc)
    page, status = render("console/error.html", kind.status, title=kind.title, detail=exc.detail)
    response = Response(page, status=status, mimetype="text/html")
    if isinstance(exc, RateLimited | ServiceUnavailable) and exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[str, int]:
    return render(
        "console/error.html",
        exc.code or 500,
        title=exc.name,
        detail=exc.description or exc.name,
    )
