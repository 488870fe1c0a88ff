"""The console's workflow pages: the list, the graph, the table past the drawing's limit, cancel."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.console import graphs
from conveyor.auth.bootstrap import Identity
from conveyor.models import AuditEntry
from tests.console import add_people, post_form, signed_in

_BOX = re.compile(r'<a href="/console/jobs/([0-9a-f-]{36})" class="node state-(\w+)">')


@pytest.fixture
def people(identity: Identity, sessions: sessionmaker[Session]) -> dict[str, str]:
    """Return the emails of a user per role in the test tenant."""
    return add_people(sessions, identity.tenant.id)


def _diamond(client: Any, auth: dict[str, str], name: str = "diamond") -> dict[str, Any]:
    """Submit a→(b, c)→d, all waiting an hour behind `a`; return the API's view."""
    jobs = [
        {"ref": "a", "type": "system.noop", "delay_seconds": 3600},
        {"ref": "b", "type": "system.noop", "depends_on": ["a"]},
        {"ref": "c", "type": "system.noop", "depends_on": ["a"]},
        {"ref": "d", "type": "system.noop", "depends_on": ["b", "c"]},
    ]
    answer = client.post("/v1/workflows", json={"name": name, "jobs": jobs}, headers=auth)
    assert answer.status_code == 202, answer.get_json()
    view: dict[str, Any] = answer.get_json()
    return view


def test_depths_and_layout_put_each_job_after_its_deepest_parent() -> None:
    jobs = [
        {"id": "1", "ref": "a", "type": "t", "state": "queued", "depends_on": []},
        {"id": "2", "ref": "b", "type": "t", "state": "queued", "depends_on": ["a"]},
        {"id": "3", "ref": "c", "type": "t", "state": "queued", "depends_on": ["a", "b"]},
        {"id": "4", "ref": "e", "type": "t", "state": "queued", "depends_on": []},
    ]
    assert graphs.depths(jobs) == {"a": 0, "b": 1, "c": 2, "e": 0}
    placed = graphs.layout(jobs)
    assert placed["e"] == graphs.Placed(column=0, row=1)
    assert placed["c"] == graphs.Placed(column=2, row=0)


def test_a_chain_of_a_thousand_jobs_is_laid_out_without_recursion() -> None:
    jobs = [
        {"id": str(n), "ref": f"j{n}", "type": "t", "state": "queued", "depends_on": [f"j{n - 1}"]}
        for n in range(1, 1000)
    ]
    jobs.insert(0, {"id": "0", "ref": "j0", "type": "t", "state": "queued", "depends_on": []})
    assert graphs.depths(jobs)["j999"] == 999
    # Too many to draw: the page shows a table.
    assert graphs.workflow_graph(jobs, str) is None


def test_the_graph_escapes_refs_and_types() -> None:
    jobs = [{"id": "1", "ref": None, "type": "<script>", "state": "queued", "depends_on": []}]
    svg = str(graphs.workflow_graph(jobs, lambda job_id: f"/j/{job_id}"))
    assert "<script>" not in svg
    assert "&lt;script&gt;" in svg


def test_a_workflow_page_draws_its_jobs_by_state_linked_and_an_operator_cancels_it(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str], sessions: Any
) -> None:
    view = _diamond(client, auth)
    ids = {job["ref"]: job["id"] for job in view["jobs"]}
    operator = signed_in(app, people["operator"])
    page_url = f"/console/workflows/{view['id']}"
    page = operator.get(page_url).get_data(as_text=True)
    assert '<svg class="graph"' in page
    boxes = dict(_BOX.findall(page))
    assert boxes == {
        ids["a"]: "scheduled",
        **dict.fromkeys((ids["b"], ids["c"], ids["d"]), "scheduled"),
    }
    assert page.count('class="edge"') == 4  # a→b, a→c, b→d, c→d
    assert "4 jobs in 3 levels" in page
    assert ">Cancel workflow<" in page
    # Each job's page leads back to its workflow.
    job_page = operator.get(f"/console/jobs/{ids['d']}").get_data(as_text=True)
    assert f'href="{page_url}"' in job_page

    done = post_form(operator, f"{page_url}/cancel", page=page_url)
    assert done.status_code == 302
    assert done.headers["Location"] == page_url
    after = operator.get(page_url).get_data(as_text=True)
    assert "Workflow cancelled" in after
    assert set(dict(_BOX.findall(after)).values()) == {"cancelled"}
    assert ">Cancel workflow<" not in after
    api = client.get(f"/v1/workflows/{view['id']}", headers=auth).get_json()
    assert api["state"] == "cancelled"
    with sessions() as session:
        targets = session.scalars(
            select(AuditEntry.target_id).where(AuditEntry.action == "workflow.cancel")
        ).all()
    assert view["id"] in [str(t) for t in targets]
    # Cancelling it again is refused on the page, not an error page.
    again = post_form(operator, f"{page_url}/cancel", page=page_url)
    assert again.status_code == 302
    assert "cannot be cancelled" in operator.get(page_url).get_data(as_text=True)


def test_a_viewer_sees_the_graph_and_no_cancel_button_and_may_not_cancel(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str]
) -> None:
    view = _diamond(client, auth)
    viewer = signed_in(app, people["viewer"])
    page_url = f"/console/workflows/{view['id']}"
    page = viewer.get(page_url).get_data(as_text=True)
    assert len(_BOX.findall(page)) == 4
    assert "Cancel workflow" not in page
    refused = post_form(viewer, f"{page_url}/cancel", page=page_url)
    assert refused.status_code == 403
    assert client.get(f"/v1/workflows/{view['id']}", headers=auth).get_json()["state"] == (
        "running"
    )


def test_past_the_drawing_limit_the_jobs_are_a_table(
    app: Any,
    client: Any,
    auth: dict[str, str],
    people: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    view = _diamond(client, auth)
    monkeypatch.setattr(graphs, "MAX_DRAWN", 3)
    monkeypatch.setattr("api.console.workflows.MAX_DRAWN", 3)
    page = signed_in(app, people["viewer"]).get(f"/console/workflows/{view['id']}")
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "<svg" not in text
    assert "more than 3 are listed as a table" in text
    for job in view["jobs"]:
        assert f'href="/console/jobs/{job["id"]}"' in text
    assert "<td>b, c</td>" in text  # d's dependencies


def test_the_list_filters_by_state_and_name_and_pages_by_keyset(
    app: Any, client: Any, auth: dict[str, str], people: dict[str, str]
) -> None:
    name = f"nightly-{uuid.uuid4().hex[:8]}"
    made = [_diamond(client, auth, name)["id"] for _ in range(3)]
    other = _diamond(client, auth)["id"]
    viewer = signed_in(app, people["viewer"])
    first = viewer.get(f"/console/workflows?name={name}&limit=2&state=").get_data(as_text=True)
    assert made[2] in first
    assert made[1] in first
    assert made[0] not in first
    assert other not in first
    (next_url,) = re.findall(r'href="([^"]+)" rel="next"', first)
    next_url = next_url.replace("&amp;", "&")
    assert f"name={name}" in next_url
    second = viewer.get(next_url).get_data(as_text=True)
    assert made[0] in second
    assert made[1] not in second
    assert 'rel="next"' not in second
    assert "First page" in second
    running = viewer.get(f"/console/workflows?name={name}&state=running").get_data(as_text=True)
    assert all(w in running for w in made)
    assert "No workflow matches." in viewer.get(
        f"/console/workflows?name={name}&state=succeeded"
    ).get_data(as_text=True)
    bad = viewer.get("/console/workflows?state=bogus").get_data(as_text=True)
    assert 'role="alert"' in bad
    assert "state" in bad
    assert 'role="alert"' in viewer.get("/console/workflows?cursor=nonsense").get_data(as_text=True)
    # The list links to the page of each workflow.
    assert f'href="/console/workflows/{made[2]}"' in first
