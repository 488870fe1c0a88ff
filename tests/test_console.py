"""The operator console: sign-in, cookies, CSRF, every page, roles, and the actions' effects."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import streams
from conveyor.auth.bootstrap import Identity
from conveyor.ledger.work import Work
from conveyor.models import AuditEntry, Job
from conveyor.settings import Settings
from tests.console import PASSWORD, add_people, csrf_of, post_form, sign_in, signed_in
from tests.factories import other_tenant
from tests.sse import opened, run_to_success

PAGES = (
    "/console/",
    "/console/jobs",
    "/console/workflows",
    "/console/queues",
    "/console/limits",
    "/console/schedules",
    "/console/webhooks",
    "/console/keys",
    "/console/audit",
)
# Expected status of each page per role: the API's permission table.
PAGE_ACCESS = {
    "admin": dict.fromkeys(PAGES, 200),
    "operator": {**dict.fromkeys(PAGES, 200), "/console/audit": 403},
    "member": {
        **dict.fromkeys(PAGES, 200),
        "/console/queues": 403,
        "/console/webhooks": 403,
        "/console/keys": 403,
        "/console/audit": 403,
    },
}
PAGE_ACCESS["viewer"] = PAGE_ACCESS["member"]


@pytest.fixture
def people(identity: Identity, sessions: sessionmaker[Session]) -> dict[str, str]:
    """Return the emails of a user per role in the test tenant (password `PASSWORD`)."""
    return add_people(sessions, identity.tenant.id)


def _job(client: Any, auth: dict[str, str], **body: Any) -> str:
    body = {"type": "system.noop", "delay_seconds": 3600, **body}
    answer = client.post("/v1/jobs", json=body, headers=auth)
    assert answer.status_code in (200, 202), answer.get_json()
    job_id: str = answer.get_json()["id"]
    return job_id


def _dead_job(client: Any, auth: dict[str, str], **body: Any) -> str:
    job_id = _job(client, auth, **body)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    return job_id


def _state(client: Any, auth: dict[str, str], job_id: str) -> str:
    state: str = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["state"]
    return state


def _audited(sessions: sessionmaker[Session], action: str) -> list[str]:
    with sessions() as session:
        return list(
            session.scalars(select(AuditEntry.target_id).where(AuditEntry.action == action))
        )


def test_a_stranger_is_sent_to_the_sign_in_form_with_labelled_fields(client: Any) -> None:
    answer = client.get("/console/jobs")
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/console/sign-in?next=/console/jobs")
    page = client.get("/console/sign-in").get_data(as_text=True)
    assert '<label for="email">Email</label>' in page
    assert '<label for="password">Password</label>' in page
    assert re.search(r'<button type="submit">Sign in</button>', page)


def test_signing_in_sets_a_strict_private_cookie_and_goes_where_asked(
    client: Any, people: dict[str, str]
) -> None:
    token = csrf_of(client.get("/console/sign-in"))
    answer = client.post(
        "/console/sign-in",
        data={
            "email": people["admin"],
            "password": PASSWORD,
            "csrf_token": token,
            "next": "/console/queues",
        },
    )
    assert answer.status_code == 302
    assert answer.headers["Location"] == "/console/queues"
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("conveyor_console=")
    # The test settings are not development: the cookie is Secure too.
    for flag in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/console"):
        assert flag in cookie, cookie
    assert client.get("/console/").status_code == 200


def test_next_never_leads_off_the_console(client: Any, people: dict[str, str]) -> None:
    data = {"email": people["viewer"], "password": PASSWORD}
    for elsewhere in ("https://evil.example/", "//evil.example/console/", "/v1/jobs"):
        # Each sign-in starts a new session, with a new CSRF token.
        token = csrf_of(client.get("/console/sign-in"))
        answer = client.post(
            "/console/sign-in", data={**data, "csrf_token": token, "next": elsewhere}
        )
        assert answer.headers["Location"] == "/console/", elsewhere


def test_development_cookies_are_not_secure(
    make_app: Callable[..., Any], people: dict[str, str]
) -> None:
    client = make_app(env="development").test_client()
    answer = sign_in(client, people["admin"])
    assert "Secure" not in answer.headers["Set-Cookie"]
    assert "HttpOnly" in answer.headers["Set-Cookie"]


def test_a_wrong_password_is_refused_without_a_session(client: Any, people: dict[str, str]) -> None:
    answer = sign_in(client, people["admin"], "wrong password!")
    assert answer.status_code == 401
    assert "the email or password is wrong" in answer.get_data(as_text=True)
    assert client.get("/console/").status_code == 302


def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str]
) -> None:
    job_id = _job(client, auth)
    admin = signed_in(app, people["admin"])
    forged = admin.post(f"/console/jobs/{job_id}/cancel", data={"csrf_token": "forged"})
    assert forged.status_code == 403
    assert "stale or forged" in forged.get_data(as_text=True)
    assert admin.post(f"/console/jobs/{job_id}/cancel").status_code == 403
    assert _state(client, auth, job_id) == "scheduled"
    # Nor can a sign-in form be posted from elsewhere.
    stranger = app.test_client()
    data = {"email": people["admin"], "password": PASSWORD}
    assert stranger.post("/console/sign-in", data=data).status_code == 403
    # With the session's token the same form works.
    done = post_form(admin, f"/console/jobs/{job_id}/cancel")
    assert done.status_code == 302
    assert _state(client, auth, job_id) == "cancelled"


def test_signing_out_ends_the_session_even_for_a_copied_cookie(
    app: Any, people: dict[str, str]
) -> None:
    admin = signed_in(app, people["admin"])
    cookie = admin.get_cookie("conveyor_console", path="/console")
    assert cookie is not None
    copy = app.test_client()
    copy.set_cookie("conveyor_console", cookie.value, path="/console")
    assert copy.get("/console/").status_code == 200
    assert post_form(admin, "/console/sign-out").headers["Location"] == "/console/sign-in"
    assert admin.get("/console/").status_code == 302
    # The login family is revoked: the copy, still holding the old cookie, is out too.
    assert copy.get("/console/").status_code == 302


def test_a_deactivated_user_is_out_at_once(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str]
) -> None:
    viewer = signed_in(app, people["viewer"])
    assert viewer.get("/console/").status_code == 200
    users = client.get("/v1/users", headers=auth).get_json()["items"]
    (user,) = [u for u in users if u["email"] == people["viewer"]]
    assert (
        client.patch(f"/v1/users/{user['id']}", json={"is_active": False}, headers=auth).status_code
        == 200
    )
    assert viewer.get("/console/").status_code == 302


@pytest.mark.parametrize("role", ["admin", "operator", "member", "viewer"])
def test_every_page_answers_each_role_as_the_api_would(
    app: Any, people: dict[str, str], role: str
) -> None:
    client = signed_in(app, people[role])
    got = {page: client.get(page).status_code for page in PAGES}
    assert got == PAGE_ACCESS[role]
    nav = client.get("/console/").get_data(as_text=True)
    # The menu offers only the pages the role may open.
    for page, status in PAGE_ACCESS[role].items():
        assert (f'href="{page}"' in nav) == (status == 200), (role, page)


def test_a_viewer_finds_no_buttons_and_may_not_act(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str]
) -> None:
    job_id = _dead_job(client, auth)
    viewer = signed_in(app, people["viewer"])
    page = viewer.get(f"/console/jobs/{job_id}").get_data(as_text=True)
    assert job_id in page
    assert "cancelled" in page
    assert ">Retry<" not in page
    assert ">Cancel<" not in page
    listing = viewer.get("/console/jobs").get_data(as_text=True)
    assert job_id in listing
    assert "Retry selected" not in listing
    assert 'name="ids"' not in listing
    refused = post_form(viewer, f"/console/jobs/{job_id}/retry")
    assert refused.status_code == 403
    assert "may not retry" in refused.get_data(as_text=True)
    bulk = post_form(viewer, "/console/jobs/bulk", {"bulk": "retry-filter", "confirmed": "yes"})
    assert bulk.status_code == 403
    assert _state(client, auth, job_id) == "cancelled"
    # An operator sees the buttons on the same job.
    operator = signed_in(app, people["operator"])
    assert ">Retry<" in operator.get(f"/console/jobs/{job_id}").get_data(as_text=True)


def test_retry_and_cancel_from_the_job_page_are_audited(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str], sessions: Any
) -> None:
    job_id = _job(client, auth)
    admin = signed_in(app, people["admin"])
    page = f"/console/jobs/{job_id}"
    assert ">Cancel<" in admin.get(page).get_data(as_text=True)
    cancelled = post_form(admin, f"{page}/cancel", page=page)
    assert cancelled.headers["Location"] == page
    shown = admin.get(page).get_data(as_text=True)
    assert "Cancelled." in shown
    assert ">Retry<" in shown
    assert post_form(admin, f"{page}/retry", page=page).status_code == 302
    assert _state(client, auth, job_id) == "queued"
    assert job_id in _audited(sessions, "job.cancel")
    assert job_id in _audited(sessions, "job.retry")
    # Retrying a queued job is refused, said on the page, not an error page.
    again = post_form(admin, f"{page}/retry", page=page)
    assert again.status_code == 302
    assert "cannot be retried" in admin.get(page).get_data(as_text=True)
    timeline = admin.get(page).get_data(as_text=True)
    assert timeline.count("→") >= 3  # submitted, cancelled, queued again


def test_the_list_filters_finds_by_id_and_pages_by_keyset(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str]
) -> None:
    tag = uuid.uuid4().hex[:10]
    ids = [_job(client, auth, tags=[tag]) for _ in range(3)]
    other = _job(client, auth)
    viewer = signed_in(app, people["viewer"])
    first = viewer.get(f"/console/jobs?tag={tag}&limit=2&state=").get_data(as_text=True)
    assert ids[2] in first
    assert ids[1] in first
    assert ids[0] not in first
    assert other not in first
    (next_url,) = re.findall(r'href="([^"]+)" rel="next"', first)
    next_url = next_url.replace("&amp;", "&")
    assert f"tag={tag}" in next_url
    assert "limit=2" in next_url
    second = viewer.get(next_url).get_data(as_text=True)
    assert ids[0] in second
    assert ids[1] not in second
    assert 'rel="next"' not in second
    by_type = viewer.get("/console/jobs?type=system.noop&state=scheduled").get_data(as_text=True)
    assert other in by_type
    assert "No job matches." in viewer.get(
        f"/console/jobs?tag={tag}&created_after=2999-01-01T00:00"
    ).get_data(as_text=True)
    bad = viewer.get("/console/jobs?state=bogus").get_data(as_text=True)
    assert "state" in bad
    assert 'role="alert"' in bad
    found = viewer.get(f"/console/jobs?id={other}")
    assert found.headers["Location"] == f"/console/jobs/{other}"
    assert "is not a job id" in viewer.get(
        "/console/jobs?id=nonsense", follow_redirects=True
    ).get_data(as_text=True)


def test_bulk_retry_of_a_selection_asks_first_then_retries_and_audits(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str], sessions: Any
) -> None:
    dead = [_dead_job(client, auth) for _ in range(3)]
    admin = signed_in(app, people["operator"])
    data = {"bulk": "retry-selected", "ids": dead[:2]}
    confirm = post_form(admin, "/console/jobs/bulk", data)
    page = confirm.get_data(as_text=True)
    assert confirm.status_code == 200
    assert "Yes, retry" in page
    assert dead[0] in page
    assert dead[2] not in page
    assert [_state(client, auth, j) for j in dead] == ["cancelled"] * 3
    done = post_form(admin, "/console/jobs/bulk", {**data, "confirmed": "yes"})
    assert done.status_code == 302
    assert [_state(client, auth, j) for j in dead] == ["queued", "queued", "cancelled"]
    assert set(dead[:2]) <= set(_audited(sessions, "job.retry"))
    assert "2 jobs retried." in admin.get(done.headers["Location"]).get_data(as_text=True)


def test_bulk_cancel_and_retry_of_a_filter(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str], sessions: Any
) -> None:
    tag = uuid.uuid4().hex[:10]
    waiting = [_job(client, auth, tags=[tag]) for _ in range(3)]
    bystander = _job(client, auth)
    admin = signed_in(app, people["admin"])
    form = {"bulk": "cancel-filter", "tag": tag}
    confirm = post_form(admin, "/console/jobs/bulk", form).get_data(as_text=True)
    assert f"tag={tag}" in confirm
    assert "Yes, cancel" in confirm
    post_form(admin, "/console/jobs/bulk", {**form, "confirmed": "yes"})
    assert [_state(client, auth, j) for j in waiting] == ["cancelled"] * 3
    assert _state(client, auth, bystander) == "scheduled"
    assert set(waiting) <= set(_audited(sessions, "job.cancel"))
    retry = {"bulk": "retry-filter", "tag": tag, "state": "cancelled", "confirmed": "yes"}
    post_form(admin, "/console/jobs/bulk", retry)
    assert [_state(client, auth, j) for j in waiting] == ["queued"] * 3
    assert _audited(sessions, "job.retry_many")
    # Retry of running jobs is no retry: said, nothing moved.
    refused = post_form(admin, "/console/jobs/bulk", {**retry, "state": "running"}).headers[
        "Location"
    ]
    assert "cannot be retried" in admin.get(refused).get_data(as_text=True)


def test_queues_pause_and_resume_audited(
    app: Any, people: dict[str, str], sessions: Any, settings: Settings
) -> None:
    operator = signed_in(app, people["operator"])
    queue = settings.default_queue
    page = operator.get("/console/queues").get_data(as_text=True)
    assert f"Pause {queue}" in page
    post_form(operator, f"/console/queues/{queue}/pause", page="/console/queues")
    assert f"Resume {queue}" in operator.get("/console/queues").get_data(as_text=True)
    post_form(operator, f"/console/queues/{queue}/resume", page="/console/queues")
    assert f"Pause {queue}" in operator.get("/console/queues").get_data(as_text=True)
    assert _audited(sessions, "queue.pause") == [queue]
    assert _audited(sessions, "queue.resume") == [queue]


def test_limits_are_set_and_removed(app: Any, people: dict[str, str]) -> None:
    operator = signed_in(app, people["operator"])
    post_form(operator, "/console/limits", {"key": "stripe", "max_running": "3"})
    page = operator.get("/console/limits").get_data(as_text=True)
    assert "<code>stripe</code>" in page
    assert "Remove stripe" in page
    refused = post_form(operator, "/console/limits", {"key": "stripe"})
    assert "max_running" in operator.get(refused.headers["Location"]).get_data(as_text=True)
    post_form(operator, "/console/limits/stripe/delete")
    assert "No limit is set." in operator.get("/console/limits").get_data(as_text=True)
    viewer = signed_in(app, people["viewer"])
    assert "Set a limit" not in viewer.get("/console/limits").get_data(as_text=True)
    assert post_form(viewer, "/console/limits", {"key": "x", "max_running": "1"}).status_code == 403


def test_schedules_disable_enable_and_trigger(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str]
) -> None:
    body = {"name": "nightly", "job_type": "system.noop", "interval_seconds": 3600}
    schedule_id = client.post("/v1/schedules", json=body, headers=auth).get_json()["id"]
    operator = signed_in(app, people["operator"])
    page = operator.get("/console/schedules").get_data(as_text=True)
    assert "Disable nightly" in page
    assert page.count("<time") >= 3  # next runs
    post_form(operator, f"/console/schedules/{schedule_id}/disable")
    assert client.get(f"/v1/schedules/{schedule_id}", headers=auth).get_json()["enabled"] is False
    assert "Enable nightly" in operator.get("/console/schedules").get_data(as_text=True)
    post_form(operator, f"/console/schedules/{schedule_id}/enable")
    assert client.get(f"/v1/schedules/{schedule_id}", headers=auth).get_json()["enabled"] is True
    fired = post_form(operator, f"/console/schedules/{schedule_id}/trigger")
    assert fired.headers["Location"].startswith("/console/jobs/")
    job_id = fired.headers["Location"].rsplit("/", 1)[1]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["schedule_id"] == schedule_id


def test_webhooks_show_their_secret_once(app: Any, people: dict[str, str]) -> None:
    admin = signed_in(app, people["admin"])
    created = post_form(
        admin,
        "/console/webhooks",
        {"url": "https://hooks.example.com/x", "events": ["job.failed"]},
    ).get_data(as_text=True)
    secret = re.search(r'<code class="copy">([^<]+)</code>', created)
    assert secret
    assert "this once" in created
    listing = admin.get("/console/webhooks").get_data(as_text=True)
    assert "https://hooks.example.com/x" in listing
    assert secret.group(1) not in listing
    (webhook_id,) = re.findall(r"/console/webhooks/([0-9a-f-]{36})/delete", listing)
    post_form(admin, f"/console/webhooks/{webhook_id}/delete")
    assert "No webhook endpoint." in admin.get("/console/webhooks").get_data(as_text=True)


def test_api_keys_show_their_secret_once_and_revoke(
    app: Any, client: Any, people: dict[str, str]
) -> None:
    operator = signed_in(app, people["operator"])
    created = post_form(operator, "/console/keys", {"name": "billing", "role": "member"}).get_data(
        as_text=True
    )
    token = re.search(r'<code class="copy" id="new-key">([^<]+)</code>', created)
    assert token
    headers = {"Authorization": f"Bearer {token.group(1)}"}
    assert client.get("/v1/me", headers=headers).get_json()["role"] == "member"
    listing = operator.get("/console/keys").get_data(as_text=True)
    assert "billing" in listing
    assert token.group(1) not in listing
    # An operator is not offered, nor given, an admin key.
    assert '<option value="admin"' not in listing
    refused = post_form(operator, "/console/keys", {"name": "x", "role": "admin"})
    assert "cannot grant" in operator.get(refused.headers["Location"]).get_data(as_text=True)
    ids = re.findall(r"/console/keys/([0-9a-f-]{36})/revoke", listing)
    for key_id in ids:
        if f"{key_id}/revoke" in listing and "billing" in listing:
            post_form(operator, f"/console/keys/{key_id}/revoke")
    assert client.get("/v1/me", headers=headers).status_code == 401


def test_the_audit_log_shows_console_actions_to_admins(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str]
) -> None:
    job_id = _job(client, auth)
    admin = signed_in(app, people["admin"])
    post_form(admin, f"/console/jobs/{job_id}/cancel")
    page = admin.get("/console/audit").get_data(as_text=True)
    assert "job.cancel" in page
    assert f"/console/jobs/{job_id}" in page


def test_a_job_with_a_file_offers_its_download(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str], sessions: Any
) -> None:
    from conveyor.files import ArtifactWriter

    job_id = _job(client, auth)
    with sessions.begin() as session:
        writer = ArtifactWriter(session, uuid.UUID(job_id), "report.csv", "text/csv")
        writer.write(b"a,b\n1,2\n")
        writer.close()
    viewer = signed_in(app, people["viewer"])
    assert "Download report.csv" in viewer.get(f"/console/jobs/{job_id}").get_data(as_text=True)
    download = viewer.get(f"/console/jobs/{job_id}/artifact")
    assert download.get_data() == b"a,b\n1,2\n"
    assert "attachment" in download.headers["Content-Disposition"]


def test_sign_in_shares_the_api_login_rate_limits(
    make_app: Callable[..., Any], people: dict[str, str]
) -> None:
    app = make_app(rate_limits_enabled=True, auth_rate_limit_email="3/minute")
    client = app.test_client()
    for _ in range(2):
        assert sign_in(client, people["viewer"], "wrong password!").status_code == 401
    # The API's login counts in the same window: the third attempt, there, is the last.
    api = client.post("/v1/auth/login", json={"email": people["viewer"], "password": "nope"})
    assert api.status_code == 401
    limited = sign_in(client, people["viewer"])
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers
    assert "too many" in limited.get_data(as_text=True)
    # Showing the form is not a sign-in attempt.
    assert client.get("/console/sign-in").status_code == 200


def test_pages_are_private_and_framed_by_nothing(app: Any, people: dict[str, str]) -> None:
    admin = signed_in(app, people["admin"])
    answer = admin.get("/console/")
    assert answer.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
    # A static file's answer holds the file open until closed.
    with admin.get("/console/static/console.js") as script:
        assert script.status_code == 200
        assert b"X-Console-Fragment" in script.get_data()
    # The page's times are UTC, and it says so.
    assert "UTC" in answer.get_data(as_text=True)


def test_another_tenants_job_is_a_404_page(
    app: Any,
    client: Any,
    auth: dict[str, str],
    people: dict[str, str],
    sessions: Any,
    settings: Settings,
) -> None:
    from tests.factories import other_tenant

    job_id = _job(client, auth)
    outsider = other_tenant(sessions, settings)
    emails = add_people(sessions, outsider.tenant.id)
    stranger = signed_in(app, emails["admin"])
    answer = stranger.get(f"/console/jobs/{job_id}")
    assert answer.status_code == 404
    assert "Not found" in answer.get_data(as_text=True)
    assert job_id not in stranger.get("/console/jobs").get_data(as_text=True)
    with sessions() as session:
        assert session.get(Job, uuid.UUID(job_id)) is not None


def test_pages_listen_to_their_tenants_stream_and_a_job_page_to_its_job(
    app: Any,
    client: Any,
    auth: dict[str, str],
    people: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    work: Work,
    monkeypatch: Any,
) -> None:
    # Heartbeats often: a stream notices its client left at the next one.
    monkeypatch.setattr(streams, "HEARTBEAT_SECONDS", 0.2)
    operator = signed_in(app, people["operator"])
    outsider = other_tenant(sessions, settings).tenant.id
    stranger = signed_in(app, add_people(sessions, outsider)["admin"])
    answer = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth)
    job_id = answer.get_json()["id"]
    assert 'data-stream="/console/events"' in operator.get("/console/jobs").get_data(as_text=True)
    page = operator.get(f"/console/jobs/{job_id}").get_data(as_text=True)
    assert f'data-stream="/console/jobs/{job_id}/events"' in page
    assert stranger.get(f"/console/jobs/{job_id}/events").status_code == 404
    with (
        opened(operator, "/console/events", {}) as tenant,
        opened(operator, f"/console/jobs/{job_id}/events", {}) as job,
        opened(stranger, "/console/events", {}) as theirs,
    ):
        first = job.next()
        assert first is not None
        assert first["data"]["state"] == "queued"
        run_to_success(work, job_id)
        seen = [tenant.next(), tenant.next()]
        followed = [job.next(), job.next()]
        assert job.next() is None  # a job page's stream ends with its job
        theirs.assert_quiet(0.5)
    assert [(f["data"]["id"], f["data"]["state"]) for f in seen if f] == [
        (job_id, "running"),
        (job_id, "succeeded"),
    ]
    assert [f["data"]["state"] for f in followed if f] == ["running", "succeeded"]
    # A finished job's page listens to the tenant's stream instead (a retry brings it back).
    page = operator.get(f"/console/jobs/{job_id}").get_data(as_text=True)
    assert 'data-stream="/console/events"' in page
