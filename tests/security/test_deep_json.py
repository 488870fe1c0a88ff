"""Issue #15, finding 3: JSON nested past the limit is refused at the edge, never a 500.

A payload ~500 levels deep broke pydantic's serializer (a 500, and in development a
worker stuck for tens of seconds rendering the traceback's locals); metadata ~900 deep
was stored. Every JSON body now meets one depth limit before any model sees it, and a
job's result meets the same limit before it is stored.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.errors import PermanentError, ResultTooDeep
from conveyor.models import Job, Schedule
from conveyor.nesting import MAX_JSON_DEPTH, render_path, too_deep
from tests.test_api import assert_problem
from worker.runner import _as_result


def arrays(levels: int) -> str:
    """Return `levels` arrays nested in one another, as JSON text."""
    return "[" * levels + "]" * levels


def deep(levels: int) -> Any:
    """Return `levels` objects nested in one another."""
    value: Any = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


DEEP = "<deep>"  # where `with_deep` puts the deep arrays
SCHEDULE = {"name": "s", "job_type": "system.noop", "interval_seconds": 60}


def with_deep(body: dict[str, Any], levels: int) -> str:
    """Return `body` as JSON text with `levels` nested arrays where it says DEEP."""
    return json.dumps(body).replace(json.dumps(DEEP), arrays(levels))


@pytest.mark.parametrize("levels", [300, 900])
@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        (
            "/v1/jobs",
            {"type": "http.request", "payload": {"url": "https://example.com/", "json": DEEP}},
            "payload.json[0][0][0][0][0][0]…",
        ),
        (
            "/v1/jobs",
            {"type": "system.noop", "metadata": {"x": DEEP}},
            "metadata.x[0][0][0][0][0][0]…",
        ),
        (
            "/v1/jobs/batch",
            {"jobs": [{"type": "system.noop"}, {"type": "system.noop", "metadata": {"x": DEEP}}]},
            "jobs[1].metadata.x[0][0][0][0]…",
        ),
        ("/v1/schedules", {**SCHEDULE, "payload": {"x": DEEP}}, "payload.x[0][0][0][0][0][0]…"),
    ],
    ids=["payload", "metadata", "batch", "schedule"],
)
def test_a_deep_body_is_a_422_naming_the_field(
    client: Any,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    url: str,
    body: dict[str, Any],
    field: str,
    levels: int,
) -> None:
    text = with_deep(body, levels)
    response = client.post(url, data=text, content_type="application/json", headers=auth)
    problem = assert_problem(response, 422)
    assert problem["errors"] == [
        {"field": field, "message": f"nested deeper than {MAX_JSON_DEPTH} levels"}
    ]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(Schedule)) == 0


def test_a_body_at_the_limit_is_accepted(client: Any, auth: dict[str, str]) -> None:
    body = {"type": "system.noop", "metadata": {"x": DEEP}}
    # The body is level 0, `metadata` level 1, and its innermost array level 64.
    at_limit = with_deep(body, MAX_JSON_DEPTH - 1)
    response = client.post("/v1/jobs", data=at_limit, content_type="application/json", headers=auth)
    assert response.status_code == 202, response.get_data(as_text=True)
    job = client.get(f"/v1/jobs/{response.get_json()['id']}", headers=auth).get_json()
    assert job["metadata"] == json.loads(at_limit)["metadata"]
    one_more = with_deep(body, MAX_JSON_DEPTH)
    response = client.post("/v1/jobs", data=one_more, content_type="application/json", headers=auth)
    assert assert_problem(response, 422)["errors"][0]["field"].startswith("metadata.x[0]")


def test_a_body_too_deep_for_the_parser_is_a_422_too(client: Any, auth: dict[str, str]) -> None:
    body = '{"a":' * 50_000 + "1" + "}" * 50_000
    response = client.post("/v1/jobs", data=body, content_type="application/json", headers=auth)
    assert assert_problem(response, 422)["errors"] == [
        {"field": "body", "message": f"nested deeper than {MAX_JSON_DEPTH} levels"}
    ]


def test_the_walk_names_the_first_place_past_the_limit() -> None:
    assert too_deep({"a": [1, {"b": 2}], "c": "x"}, limit=2) is None
    assert too_deep({"a": [1, {"b": []}]}, limit=2) == ["a", 1, "b"]
    assert too_deep([[[[]]]], limit=2) == [0, 0, 0]
    assert too_deep("scalar", limit=0) is None
    # No recursion: far deeper than Python's own recursion limit.
    assert len(too_deep(deep(100_000)) or []) == MAX_JSON_DEPTH + 1
    long_key = {"k" * 100: deep(100)}
    assert render_path(too_deep(long_key) or []) == "k" * 40 + "….a.a.a.a.a.a.a…"
    assert render_path(["x", 0, "y"], root="result") == "result.x[0].y"


class Tree(BaseModel):
    """A job result that can hold anything."""

    value: Any


def test_a_deep_result_fails_its_job_for_good() -> None:
    assert _as_result({"tree": deep(MAX_JSON_DEPTH)}, limit=1 << 20) is not None
    with pytest.raises(ResultTooDeep, match=r"deeper than 64 levels \(at result\.tree\.a\.a"):
        _as_result({"tree": deep(MAX_JSON_DEPTH + 1)}, limit=1 << 20)
    with pytest.raises(ResultTooDeep):
        _as_result(Tree(value=deep(100)), limit=1 << 20)
    # Past pydantic's own serializer limit the model cannot even be dumped.
    with pytest.raises(PermanentError, match="cannot be serialised"):
        _as_result(Tree(value=deep(900)), limit=1 << 20)
