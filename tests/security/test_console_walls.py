"""The console's walls between tenants, as `test_tenant_matrix.py` holds the API's.

Every console route with an object id in its path, found in the app's URL map (a new route
is covered as soon as it exists), is called by another tenant's signed-in admin on this
tenant's object: a 404 page, and nothing changes; the owner's same call works. A bulk
action naming another tenant's jobs moves none of them.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.settings import Settings
from tests.conftest import row_counts
from tests.console import add_people, csrf_of, signed_in
from tests.factories import other_tenant
from tests.security.test_tenant_matrix import (
    TABLES,
    Make,
    _dead_job,
    _job,
    _job_with_artifact,
    _key,
    _schedule,
    _webhook,
    _workflow,
)

# Per path argument: how the owner makes one.
KINDS: dict[str, Make] = {
    "job_id": _job,
    "schedule_id": _schedule,
    "key_id": _key,
    "webhook_id": _webhook,
    "workflow_id": _workflow,
}
# Path arguments that are names within the caller's own tenant, or a file, not objects.
NAMES = frozenset({"queue", "key", "filename"})
# Endpoints that need an object in some state for the owner's own call to succeed.
STATES: dict[str, Make] = {"console.retry": _dead_job, "console.artifact": _job_with_artifact}
# Values of the other path arguments, per endpoint.
ACTIONS = {"console.schedule_action": ("disable", "enable", "trigger")}


def console_id_routes(app: Flask) -> list[tuple[str, str, str, str]]:
    """Return (method, rule, endpoint, id argument) for every console route with an id."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/console/") or not rule.arguments:
            continue
        ids = rule.arguments - NAMES - {"action"}
        if not ids:
            continue
        (argument,) = ids
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((method, rule.rule, rule.endpoint, argument))
    return sorted(routes)


def _call(client: Any, method: str, path: str) -> Any:
    if method == "GET":
        return client.get(path)
    token = csrf_of(client.get("/console/jobs"))
    return client.post(path, data={"csrf_token": token})


def test_another_tenants_object_is_a_404_page_on_every_console_route(
    app: Flask,
    client: Any,
    auth: dict[str, str],
    identity: Identity,
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    outsider = other_tenant(sessions, settings)
    stranger = signed_in(app, add_people(sessions, outsider.tenant.id)["admin"])
    owner = signed_in(app, add_people(sessions, identity.tenant.id)["admin"])
    routes = console_id_routes(app)
    assert {argument for *_, argument in routes} <= KINDS.keys(), "a new kind of id: add it"
    named = {"console.job", "console.retry", "console.cancel", "console.artifact"}
    named |= {"console.revoke", "console.delete_webhook"}
    named |= {"console.workflow", "console.cancel_workflow"}
    assert named <= {r[2] for r in routes}
    for method, rule, endpoint, argument in routes:
        for action in ACTIONS.get(endpoint, ("",)):
            object_id = STATES.get(endpoint, KINDS[argument])(client, auth, sessions)
            path = rule.replace(f"<{argument}>", object_id).replace("<action>", action)
            counts = row_counts(sessions, *TABLES)

            answer = _call(stranger, method, path)

            assert answer.status_code == 404, (method, path, answer.status_code)
            assert answer.mimetype == "text/html"
            assert "Not found" in answer.get_data(as_text=True)
            assert row_counts(sessions, *TABLES) == counts, f"{method} {rule} {action}"
            # The owner's same call works: the 404 is the wall, not a broken object.
            owned = _call(owner, method, path)
            owned.close()  # a streamed answer (the artifact) holds its transaction until closed
            assert 200 <= owned.status_code < 400, (method, path, owned.status_code)


def test_a_bulk_action_on_another_tenants_jobs_moves_none(
    app: Flask,
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    waiting, dead = _job(client, auth, sessions), _dead_job(client, auth, sessions)
    outsider = other_tenant(sessions, settings)
    stranger = signed_in(app, add_people(sessions, outsider.tenant.id)["admin"])
    for bulk, job_id in (("cancel-selected", waiting), ("retry-selected", dead)):
        token = csrf_of(stranger.get("/console/jobs"))
        data = {"bulk": bulk, "ids": [job_id], "confirmed": "yes", "csrf_token": token}
        counts = row_counts(sessions, *TABLES)
        done = stranger.post("/console/jobs/bulk", data=data, follow_redirects=True)
        assert "0 jobs" in done.get_data(as_text=True)
        assert row_counts(sessions, *TABLES) == counts
    assert client.get(f"/v1/jobs/{waiting}", headers=auth).get_json()["state"] == "scheduled"
    assert client.get(f"/v1/jobs/{dead}", headers=auth).get_json()["state"] == "cancelled"
