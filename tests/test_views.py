"""The hand-built job view is exactly the JSON dump of its pydantic model, in UTC."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from conveyor.ledger.states import JobState
from conveyor.ledger.views import JobOut, job_view

NOW = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)


def row(**values: Any) -> dict[str, Any]:
    """Return the values submit writes for a job, with `values` over them."""
    return {
        "id": uuid.uuid4(),
        "tenant_id": uuid.uuid4(),
        "type": "system.noop",
        "queue": "default",
        "state": JobState.QUEUED,
        "priority": 5,
        "payload": {"seconds": 1.5, "nested": {"a": [1, None, "x"]}},
        "tags": ["demo"],
        "metadata": {"requested_by": "docs"},
        "callback_url": None,
        "schedule_id": None,
        "schedule_occurrence": None,
        "attempt": 0,
        "max_attempts": 3,
        "scheduled_for": None,
        "expires_at": None,
        "created_at": NOW,
        "published_at": NOW,
        **values,
    }


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"created_at": NOW.replace(microsecond=0), "tags": [], "metadata": {}, "payload": {}},
        {
            "state": JobState.SCHEDULED,
            "scheduled_for": datetime(
                2027, 1, 1, 12, tzinfo=timezone(timedelta(hours=5, minutes=30))
            ),
            "expires_at": datetime(2027, 1, 2, tzinfo=timezone(timedelta(hours=-3))),
            "schedule_id": uuid.uuid4(),
            "schedule_occurrence": NOW,
        },
        {"state": JobState.FAILED, "error_type": "Boom", "error_message": None, "attempt": 3},
        {"state": JobState.SUCCEEDED, "error_type": "Old", "result": {"ok": True}},
        {"started_at": NOW, "finished_at": NOW, "cancel_requested_at": NOW, "state": "running"},
    ],
)
def test_the_view_of_a_row_is_what_jobout_dumps(values: dict[str, Any]) -> None:
    view = job_view(row(**values))
    expected = JobOut.model_validate(view).model_dump(mode="json")
    assert view == expected
    assert list(view) == list(JobOut.model_fields)  # the live view's bytes follow this order
    # Every time in UTC, whatever offset the row carried: one job, one ETag.
    assert all(
        value is None or value.endswith("Z")
        for key, value in view.items()
        if key.endswith("_at") or key == "scheduled_for"
    )
