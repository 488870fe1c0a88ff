"""The log of a job's webhook deliveries, read from the delivery jobs' own histories.

Apart from `conveyor.webhooks`, which the ledger's statements import: this reads the ledger.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from conveyor.ledger.reads import job_row
from conveyor.models import Job, JobEvent
from conveyor.webhooks import DELIVER_TYPE


def job_deliveries(
    session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, *, show_url: bool
) -> list[dict[str, Any]]:
    """Return every delivery attempt of a job's events (`NotFound` for another tenant's job).

    Each: where it went (None unless `show_url`), event, attempt, outcome, HTTP status,
    seconds taken and error.
    """
    job_row(session, job_id, tenant_id)
    rows = session.execute(
        select(Job.id, Job.payload, JobEvent.to_state, JobEvent.attempt, JobEvent.detail)
        .join(JobEvent, JobEvent.job_id == Job.id)
        .where(
            Job.tenant_id == tenant_id,
            Job.type == DELIVER_TYPE,
            Job.payload["job_id"].astext == str(job_id),
            JobEvent.from_state == "running",
        )
        .order_by(JobEvent.id)
    ).all()
    found = session.execute(select(Job.id, Job.result).where(Job.id.in_({r.id for r in rows})))
    results: dict[uuid.UUID, Any] = {delivery: result for delivery, result in found}
    items = []
    for delivery_id, payload, outcome, attempt, detail in rows:
        detail = detail or {}
        result = results.get(delivery_id) or {}
        items.append(
            {
                "delivery_id": str(delivery_id),
                "url": payload["url"] if show_url else None,
                "event": payload["event"],
                "attempt": attempt,
                "outcome": outcome,
                "status_code": detail.get("status_code", result.get("status")),
                "seconds": detail.get("seconds"),
                "error": detail.get("error_message"),
            }
        )
    return items
