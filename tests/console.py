"""Helpers of the console's tests: users with passwords per role, a signed-in test client."""

from __future__ import annotations

import re
import uuid
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.identity import add_user
from conveyor.auth.roles import Role

PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def add_people(sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> dict[str, str]:
    """Add a user per role to the tenant, all with `PASSWORD`; return their emails by role."""
    emails = {}
    with sessions.begin() as session:
        for role in Role:
            email = f"{role.value}-{uuid.uuid4().hex[:6]}@console.test"
            add_user(session, tenant_id, email, PASSWORD, role)
            emails[role.value] = email
    return emails


def csrf_of(page: Any) -> str:
    """Return the CSRF token a console page's forms carry."""
    found = _CSRF.search(page.get_data(as_text=True))
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def sign_in(client: Any, email: str, password: str = PASSWORD) -> Any:
    """Sign `client` in through the form, as a person would; return the answer to the POST."""
    token = csrf_of(client.get("/console/sign-in"))
    return client.post(
        "/console/sign-in", data={"email": email, "password": password, "csrf_token": token}
    )


def signed_in(app: Any, email: str) -> Any:
    """Return a new test client of `app`, signed in as `email`."""
    client = app.test_client()
    answer = sign_in(client, email)
    assert answer.status_code == 302, answer.get_data(as_text=True)
    return client


def post_form(client: Any, path: str, data: dict[str, Any] | None = None, page: str = "") -> Any:
    """POST a console form with the session's CSRF token (read from `page`, else the overview)."""
    token = csrf_of(client.get(page or "/console/jobs"))
    return client.post(path, data={**(data or {}), "csrf_token": token})
