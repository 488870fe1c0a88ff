"""Which queued jobs the broker has taken: `published_at`, written and cleared by the ledger.

Not a transition: the job's state and client view do not change, so no event is written
and no version moves.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Update, bindparam, update
from sqlalchemy.orm import Session

from conveyor.ledger.states import JobState
from conveyor.models import Job

_IDS = bindparam("p_job_ids", expanding=True, type_=Job.id.type)


def unmark_published(session: Session, job_ids: Sequence[uuid.UUID]) -> None:
    """Clear `published_at` of queued jobs whose publish failed, so the promoter publishes them."""
    session.execute(_unmark_statement(), {"p_job_ids": list(job_ids)})


def stamp_published(session: Session, job_ids: Sequence[uuid.UUID], now: datetime) -> None:
    """Stamp queued jobs as published now (the caller publishes them after the commit)."""
    session.execute(_stamp_statement(), {"p_job_ids": list(job_ids), "p_now": now})


@functools.cache
def _unmark_statement() -> Update:
    return (
        update(Job)
        # A job a worker already took (the failed publish got through after all) needs
        # nothing from the promoter.
        .where(Job.id.in_(_IDS), Job.state == JobState.QUEUED)
        .values(published_at=None)
        .execution_options(synchronize_session=False)
    )


@functools.cache
def _stamp_statement() -> Update:
    now: Any = bindparam("p_now", type_=Job.published_at.type)
    return (
        update(Job)
        .where(Job.id.in_(_IDS), Job.state == JobState.QUEUED)
        .values(published_at=now)
        .execution_options(synchronize_session=False)
    )
