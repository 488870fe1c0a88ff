"""The console in a real browser (Debian's Chromium driven by Playwright, no download).

One bounded walk through what an operator does: sign in, find a failed job by filter, retry
it and watch it succeed without reloading, cancel a running job; a viewer finds no buttons;
a workflow's graph, whose failed box leads to its job; another tenant gets a 404 page; a
forged form post is refused. Screenshots of the overview, the job list, a job page and a
workflow go to test-artifacts/.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from conveyor.auth.bootstrap import Identity
from conveyor.settings import Settings
from tests.browser import ARTIFACTS, CHROMIUM_FLAGS, chromium
from tests.conftest import wait_for
from tests.console import PASSWORD, add_people
from tests.factories import other_tenant
from worker.dispatcher import Dispatcher

# The whole walk must end well within a minute; each wait is bounded by this much.
STEP_MS = 20_000


@pytest.fixture
def served(app: Any) -> Iterator[str]:
    """Serve the API (and its console) over HTTP on 127.0.0.1 for the browser."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def _submit(client: Any, auth: dict[str, str], body: dict[str, Any]) -> str:
    answer = client.post("/v1/jobs", json=body, headers=auth)
    assert answer.status_code == 202, answer.get_json()
    job_id: str = answer.get_json()["id"]
    return job_id


def _state(client: Any, auth: dict[str, str], job_id: str) -> str:
    state: str = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["state"]
    return state


def _workflow(client: Any, auth: dict[str, str]) -> dict[str, Any]:
    """Submit extract → (transform, check) → report where `check` fails: report is cancelled."""
    jobs = [
        {"ref": "extract", "type": "system.noop"},
        {"ref": "transform", "type": "system.noop", "depends_on": ["extract"]},
        {
            "ref": "check",
            "type": "system.fail",
            "payload": {"message": "no source"},
            "depends_on": ["extract"],
        },
        {"ref": "report", "type": "system.noop", "depends_on": ["transform", "check"]},
    ]
    answer = client.post(
        "/v1/workflows", json={"name": "nightly-report", "jobs": jobs}, headers=auth
    )
    assert answer.status_code == 202, answer.get_json()
    view = answer.get_json()
    return {"id": view["id"], "refs": {job["ref"]: job["id"] for job in view["jobs"]}}


def _workflow_state(client: Any, auth: dict[str, str], workflow_id: str) -> str:
    state: str = client.get(f"/v1/workflows/{workflow_id}", headers=auth).get_json()["state"]
    return state


def _sign_in(page: Any, url: str, email: str) -> None:
    page.goto(f"{url}/console/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}/console/")


@pytest.mark.e2e
def test_an_operator_signs_in_retries_a_failure_and_cancels_a_running_job(
    served: str,
    client: Any,
    auth: dict[str, str],
    identity: Identity,
    sessions: sessionmaker[Session],
    settings: Settings,
    worker: Any,
) -> None:
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    started = time.monotonic()
    expect.set_options(timeout=STEP_MS)
    people = add_people(sessions, identity.tenant.id)
    stranger = add_people(sessions, other_tenant(sessions, settings).tenant.id)["admin"]
    done = _submit(client, auth, {"type": "system.noop"})
    failing = _submit(
        client,
        auth,
        {"type": "system.fail", "payload": {"message": "boom", "succeed_on_attempt": 2}},
    )
    flow = _workflow(client, auth)
    running = _submit(client, auth, {"type": "system.sleep", "payload": {"seconds": 60}})
    # A workflow's released jobs are the dispatcher's to publish: its passes run here.
    dispatcher = Dispatcher.for_app(worker)

    def settled() -> bool:
        dispatcher.run_once()
        return _workflow_state(client, auth, flow["id"]) == "failed"

    wait_for(settled)
    wait_for(lambda: _state(client, auth, done) == "succeeded")
    wait_for(lambda: _state(client, auth, failing) == "failed")
    wait_for(lambda: _state(client, auth, running) == "running")
    ARTIFACTS.mkdir(exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(STEP_MS)
            _sign_in(page, served, people["operator"])
            expect(page.locator("svg.chart")).to_be_visible()
            expect(page.get_by_role("heading", name="Recent failures")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "console-overview.png"), full_page=True)

            # Find the failed job by filter.
            page.get_by_role("link", name="Jobs", exact=True).click()
            page.get_by_label("State").select_option("failed")
            page.get_by_role("button", name="Filter").click()
            page.wait_for_url("**/console/jobs?state=failed*")
            row = page.locator("tr", has_text=failing[:8])
            expect(row).to_contain_text("failed")
            page.screenshot(path=str(ARTIFACTS / "console-jobs.png"), full_page=True)
            row.get_by_role("link").click()
            page.wait_for_url(f"**/console/jobs/{failing}")
            expect(page.locator("#live")).to_contain_text("boom")

            # Retry it: the page follows it to success by itself, with no reload.
            page.get_by_role("button", name="Retry").click()
            expect(page.get_by_role("status")).to_contain_text("Retried")
            page.evaluate("window.__sameDocument = true")
            expect(page.locator("#live .state").first).to_have_text("succeeded")
            assert page.evaluate("window.__sameDocument") is True
            expect(page.locator("#live")).to_contain_text('"attempt": 2')
            page.screenshot(path=str(ARTIFACTS / "console-job.png"), full_page=True)

            # Cancel a running job: asked to stop, then cancelled.
            page.goto(f"{served}/console/jobs/{running}")
            expect(page.locator("#live progress")).to_be_visible()
            expect(page.locator("#live")).to_have_attribute("data-stream-open", "1")
            page.get_by_role("button", name="Cancel").click()
            expect(page.get_by_role("status")).to_contain_text("Asked the running job to stop")
            expect(page.locator("#live .state").first).to_have_text("cancelled")
            # Shown from the job's stream: the page heard its events.
            expect(page.locator("#live")).to_have_attribute("data-last-event", re.compile(r"^\d+$"))

            # The workflow drawn as a graph: a box per job, coloured by state, each a link.
            page.get_by_role("link", name="Workflows", exact=True).click()
            page.get_by_label("Name").fill("nightly-report")
            page.get_by_role("button", name="Filter").click()
            page.locator("tr", has_text=flow["id"][:8]).get_by_role("link").click()
            page.wait_for_url(f"**/console/workflows/{flow['id']}")
            graph = page.locator("svg.graph")
            expect(graph.locator("a.node")).to_have_count(4)
            expect(graph.locator("a.node.state-succeeded")).to_have_count(2)
            expect(graph.locator("a.node.state-cancelled")).to_have_count(1)
            expect(page.get_by_role("button", name="Cancel workflow")).to_have_count(0)
            page.screenshot(path=str(ARTIFACTS / "console-workflow.png"), full_page=True)
            graph.locator("a.node.state-failed").click()
            page.wait_for_url(f"**/console/jobs/{flow['refs']['check']}")
            expect(page.locator("#live")).to_contain_text("no source")

            # A forged form post (no session token) is refused.
            status = page.evaluate(
                """url => fetch(url, {method: 'POST', body: new URLSearchParams(
                       {csrf_token: 'forged'})}).then(answer => answer.status)""",
                f"{served}/console/jobs/{done}/cancel",
            )
            assert status == 403

            # The same job page, narrow: still readable.
            page.set_viewport_size({"width": 390, "height": 844})
            page.goto(f"{served}/console/jobs/{failing}")
            page.screenshot(path=str(ARTIFACTS / "console-job-390.png"), full_page=True)
            context.close()

            # A viewer sees the job, and no button to act on it.
            viewer = browser.new_context().new_page()
            viewer.set_default_timeout(STEP_MS)
            _sign_in(viewer, served, people["viewer"])
            viewer.goto(f"{served}/console/jobs/{running}")
            expect(viewer.locator("#live")).to_contain_text("cancelled")
            expect(viewer.get_by_role("button", name="Retry")).to_have_count(0)
            expect(viewer.get_by_role("button", name="Cancel")).to_have_count(0)
            viewer.goto(f"{served}/console/jobs")
            expect(viewer.get_by_role("button", name="Retry selected")).to_have_count(0)

            # Another tenant's admin gets a 404 page for the first tenant's job.
            outsider = browser.new_context().new_page()
            outsider.set_default_timeout(STEP_MS)
            _sign_in(outsider, served, stranger)
            answer = outsider.goto(f"{served}/console/jobs/{failing}")
            assert answer is not None
            assert answer.status == 404
            expect(outsider.get_by_role("heading", name="Not found")).to_be_visible()
        finally:
            browser.close()
    shots = ("console-overview.png", "console-jobs.png", "console-job.png", "console-workflow.png")
    for name in shots:
        assert (ARTIFACTS / name).stat().st_size > 10_000, name
    assert time.monotonic() - started < 60
