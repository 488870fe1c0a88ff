"""Publish queued jobs after their transaction committed, and keep `published_at` true to it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from api.requests import request_id
from api.services import Services
from conveyor.broker import Message, Publishable
from conveyor.errors import PublishFailed
from conveyor.jobs import mark_published, unmark_published
from conveyor.states import JobState

logger = logging.getLogger(__name__)


class Committed(Publishable, Protocol):
    """A committed job: a ledger `Job` (a retry), or one just submitted."""

    @property
    def state(self) -> str: ...
    @property
    def published_at(self) -> datetime | None: ...


def publish_committed(svc: Services, jobs: Iterable[Committed]) -> None:
    """Publish the queued ones among `jobs` (all committed); failures are left to the promoter.

    Commit first, then publish: a worker must never receive an id it cannot see yet.
    Submits wrote `published_at` with the job, so a publish that succeeds costs no further
    statement; jobs without it (a retry, a schedule's trigger) are marked after it.
    """
    queued = [job for job in jobs if job.state == JobState.QUEUED]
    if not queued:
        return
    messages = [Message.of(job, request_id()) for job in queued]
    stamped = [job.id for job in queued if job.published_at is not None]
    unstamped = [job.id for job in queued if job.published_at is None]
    try:
        svc.publisher.publish(messages)
    except PublishFailed:
        logger.warning("publish of %d jobs failed; the promoter will retry", len(messages))
        # Unstamped jobs are durable with no published_at: the promoter publishes them
        # soon. Stamped ones must lose their stamp for that.
        _write_published(svc, stamped, None)
        return
    _write_published(svc, unstamped, datetime.now(UTC))


def _write_published(svc: Services, job_ids: Sequence[uuid.UUID], now: datetime | None) -> None:
    """Mark jobs published at `now`, or unmark them (`None`); a database error is only logged."""
    if not job_ids:
        return
    ids = list(job_ids)
    try:
        # One statement: on the autocommit sessions, without BEGIN and COMMIT round trips.
        with svc.reads.begin() as session:
            if now is None:
                unmark_published(session, ids)
            else:
                mark_published(session, ids, now)
    except SQLAlchemyError:
        # Marking: stored and published; at worst the promoter publishes them once more.
        # Unmarking: stored, not published, and stamped; the reconciler finds no message
        # for them after `reconcile_after` and publishes them then.
        logger.warning("could not record the publish state of %d jobs", len(ids), exc_info=True)
