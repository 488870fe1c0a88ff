"""Signing in and out of the console: email and password, a session cookie, a login family."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from flask import redirect, request, session, url_for
from werkzeug.wrappers import Response

from api.console.base import bp, render
from api.services import services
from conveyor.auth.identity import check_credentials
from conveyor.auth.tokens import record_refresh_token, revoke_family
from conveyor.errors import Unauthorized


def _next_page() -> str:
    """Return where to go after signing in: a console path only (never another site)."""
    wanted = request.values.get("next", "")
    parts = urlsplit(wanted)
    if parts.scheme or parts.netloc or not wanted.startswith("/console/"):
        return url_for("console.overview")
    return wanted


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> Response | tuple[str, int]:
    """Show the sign-in form; on a right email and password, open a console session."""
    if request.method == "GET":
        return render("console/sign_in.html", next=request.args.get("next", ""))
    email = request.form.get("email", "")
    password = request.form.get("password", "")
    svc = services()
    now = datetime.now(UTC)
    try:
        with svc.sessions.begin() as db:
            user = check_credentials(db, email, password)
            # A login family, as the API's sign-in opens: sign-out (or an admin's
            # deactivation) ends it. Its one refresh token is never handed out.
            family = uuid.uuid4()
            lifetime = timedelta(days=svc.settings.refresh_token_days)
            record_refresh_token(db, user.id, family, secrets.token_hex(16), now + lifetime)
            user_id, email = user.id, user.email
    except Unauthorized as exc:
        return render("console/sign_in.html", 401, error=exc.detail, email=email)
    # A new session id and CSRF token on every sign-in (no fixation).
    session.clear()
    session.permanent = True
    session.update(uid=str(user_id), fam=str(family), email=email)
    return redirect(_next_page())


@bp.post("/sign-out")
def sign_out() -> Response:
    """End the console session: its login family is revoked, the cookie cleared."""
    family = session.get("fam")
    if isinstance(family, str):
        with services().sessions.begin() as db:
            revoke_family(db, uuid.UUID(family), datetime.now(UTC))
    session.clear()
    return redirect(url_for("console.sign_in"))
