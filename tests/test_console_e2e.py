"""The console over a real worker: the overview counts what ran, a retry from the job page runs.

Apart from tests/test_console.py: the worker (module scope) runs only while these tests do,
so no job it runs outlives them into another test's clean-up.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.settings import Settings
from tests.conftest import wait_for
from tests.console import add_people, post_form, signed_in
from tests.test_console import _job, _state


@pytest.fixture
def people(identity: Identity, sessions: sessionmaker[Session]) -> dict[str, str]:
    """Return the emails of a user per role in the test tenant."""
    return add_people(sessions, identity.tenant.id)


@pytest.mark.e2e
def test_the_overview_counts_finishes_and_failures_and_a_retry_succeeds(
    app: Any,
    client: Any,
    auth: dict[str, str],
    people: dict[str, str],
    worker: Any,
    settings: Settings,
) -> None:
    ok = _job(client, auth, delay_seconds=None)
    failing = _job(
        client,
        auth,
        type="system.fail",
        delay_seconds=None,
        payload={"message": "boom", "succeed_on_attempt": 2},
    )
    wait_for(lambda: _state(client, auth, ok) == "succeeded")
    wait_for(lambda: _state(client, auth, failing) == "failed")
    admin = signed_in(app, people["admin"])
    overview = admin.get("/console/").get_data(as_text=True)
    assert re.search(r"over the last hour: [1-9]\d* succeeded, [1-9]\d* failed", overview)
    assert failing in overview
    assert "boom" in overview
    assert "<svg" in overview
    assert "<script" not in overview.split("</head>")[1]
    failed_list = admin.get("/console/jobs?state=failed").get_data(as_text=True)
    assert failing in failed_list
    assert ok not in failed_list
    page = f"/console/jobs/{failing}"
    shown = admin.get(page).get_data(as_text=True)
    assert "JobFailed" in shown
    assert "boom" in shown
    assert ">Retry<" in shown
    post_form(admin, f"{page}/retry", page=page)
    wait_for(lambda: _state(client, auth, failing) == "succeeded")
    # The refresh asks for the live part alone, and it shows the new state and result.
    live = admin.get(page, headers={"X-Console-Fragment": "1"}).get_data(as_text=True)
    assert "<html" not in live
    assert "succeeded" in live
    assert '"attempt": 2' in live
