"""The console's blueprint and what every page shares: who is signed in, CSRF, rendering.

A console session is a login like the API's: signing in opens a refresh-token family
(`conveyor.auth.tokens`) whose id the signed session cookie carries, and every request
reads the user's role and activity from the database, so a demotion, a deactivation or a
sign-out bites at once. The caller becomes `g.principal`, as with a bearer token, so the
API's own functions (`api.auth.current_principal`, `api.job_views.shown`) serve the console
unchanged.
"""

from __future__ import annotations

import functools
import hmac
import secrets
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, g, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from api.services import services
from conveyor.auth.keys import Principal
from conveyor.auth.roles import PERMISSIONS, Permission, Role, check_permission
from conveyor.auth.tokens import active_user_for_token
from conveyor.errors import Forbidden
from conveyor.telemetry.logs import bind_context

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
)
# Seconds between a page's refreshes of its live part while its event stream is down.
REFRESH_SECONDS = 5
# The workers shown may be a broadcast's answer this old: a page never waits on a broadcast.
WORKERS_MAX_AGE = 10.0
# Asks for a page's live part only, for the refresh (static/console.js).
FRAGMENT_HEADER = "X-Console-Fragment"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# Endpoints open to anyone: the sign-in form and the static files.
PUBLIC = frozenset({"console.sign_in", "console.static"})
V = TypeVar("V", bound=Callable[..., Any])


class CsrfRefused(Forbidden):
    """Raised when a console form arrives without this session's CSRF token."""


def csrf_token() -> str:
    """Return this session's CSRF token, made on first use."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """Refuse a write that does not carry this session's CSRF token (form field or header)."""
    sent = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    expected = session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(sent, expected):
        raise CsrfRefused("the form is stale or forged: reload the page and try again")


def signed_in() -> Principal | None:
    """Return the signed-in user as a principal, or None (no session, revoked, deactivated)."""
    try:
        user_id, family = uuid.UUID(session["uid"]), uuid.UUID(session["fam"])
    except (KeyError, ValueError, TypeError):
        return None
    with services().sessions() as db:
        user = active_user_for_token(db, user_id, family)
        if user is None:
            return None
        return Principal(
            tenant_id=user.tenant_id, role=Role(user.role), user_id=user.id, token_family=family
        )


@bp.before_request
def _guard() -> Response | None:
    # Writes first: a forged post is refused before anything else, signed in or not.
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        check_csrf()
    if request.endpoint in PUBLIC:
        return None
    principal = signed_in()
    if principal is None:
        session.pop("uid", None)
        return redirect(url_for("console.sign_in", next=request.full_path.rstrip("?")))
    g.principal = principal
    g.console_email = session.get("email", "")
    bind_context(tenant_id=principal.tenant_id)
    return None


def needs(permission: Permission) -> Callable[[V], V]:
    """Refuse the view (a 403 page) to a signed-in user whose role lacks `permission`."""

    def wrap(view: V) -> V:
        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            check_permission(g.principal.role, permission)
            return view(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap


def may(permission: Permission) -> bool:
    """Return whether the signed-in user may do `permission` (to show or hide a control)."""
    principal: Principal | None = g.get("principal")
    return principal is not None and permission in PERMISSIONS[Role(principal.role)]


def fragment_wanted() -> bool:
    """Return whether the refresh asks for the page's live part only."""
    return request.headers.get(FRAGMENT_HEADER) == "1"


def render(template: str, status: int = 200, **context: Any) -> tuple[str, int]:
    """Render a console page (or only its live part, for the refresh)."""
    return render_template(template, fragment=fragment_wanted(), **context), status


@bp.app_template_global("csrf_field")
def _csrf_field() -> str:
    return csrf_token()


@bp.context_processor
def _shared() -> dict[str, Any]:
    return {
        "may": may,
        "Permission": Permission,
        "refresh_seconds": REFRESH_SECONDS,
        "principal": g.get("principal"),
    }
