"""Publish queued jobs after their transaction committed, and note that the broker has them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from api.requests import request_id
from api.services import Services
from conveyor.broker import Message, Publishable
from conveyor.errors import PublishFailed
from conveyor.jobs import mark_published
from conveyor.states import JobState

logger = logging.getLogger(__name__)


class Committed(Publishable, Protocol):
    """A committed job: a ledger `Job` (a retry), or one just submitted."""

    @property
    def state(self) -> str: ...


def publish_committed(svc: Services, jobs: Iterable[Committed]) -> None:
    """Publish the queued ones among `jobs` (all committed); failures are left to the promoter.

    Commit first, then publish: a worker must never receive an id it cannot see yet.
    """
    messages = [Message.of(job, request_id()) for job in jobs if job.state == JobState.QUEUED]
    if not messages:
        return
    try:
        svc.publisher.publish(messages)
    except PublishFailed:
        # The jobs are durable with no published_at; the promoter publishes them soon.
        logger.warning("publish of %d jobs failed; the promoter will retry", len(messages))
        return
    try:
        # One statement: on the autocommit sessions, without BEGIN and COMMIT round trips.
        with svc.reads.begin() as session:
            mark_published(session, [m.job_id for m in messages], datetime.now(UTC))
    except SQLAlchemyError:
        # Stored and published; at worst the promoter publishes them once more.
        logger.warning("could not mark %d jobs published", len(messages), exc_info=True)
