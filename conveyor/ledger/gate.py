"""What a submitting process knows, within a moment, of paused and busy queues.

A queued job goes straight to the broker (the fastest path) unless its queue is paused
for its tenant or everyone, or the dispatcher is handing the queue out by turns because
it is busy (jobs waiting, or the broker's room full). The dispatcher says which queues are
busy in one Redis key with a short expiry, rewritten every pass: when it stops, the key
expires and submits publish directly again. Both answers are cached per process for
`ttl` seconds; a stale answer costs at most a job published into a pause (its claim sends
it back) or a few jobs ahead of their turn, never a limit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from conveyor.ledger.states import Waiting
from conveyor.models import QueuePause

logger = logging.getLogger(__name__)
BUSY_KEY = "conveyor:dispatch:busy"
# Seconds the busy list outlives the pass that wrote it.
BUSY_TTL = 5


def announce_busy(redis: Redis, queues: Collection[str]) -> None:
    """Say which queues submits should leave to the dispatcher (best effort)."""
    try:
        redis.set(BUSY_KEY, json.dumps(sorted(queues)), ex=BUSY_TTL)
    except RedisError:
        logger.warning("could not announce busy queues", exc_info=True)


class SubmitGate:
    """Tells a submit whether a queued job may be published at once (`holds` is None)."""

    def __init__(
        self,
        redis: Redis,
        reading: Callable[[], AbstractContextManager[Session]],
        *,
        ttl: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._reading = reading
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._checked = -float("inf")
        self._paused: set[tuple[uuid.UUID | None, str]] = set()
        self._busy: set[str] = set()

    def holds(self, tenant_id: uuid.UUID, queue: str) -> Waiting | None:
        """Return why a job of the tenant in `queue` waits for the dispatcher, or None."""
        self._refresh()
        if (None, queue) in self._paused or (tenant_id, queue) in self._paused:
            return Waiting.PAUSE
        if queue in self._busy:
            return Waiting.FAIR_SHARE
        return None

    def _refresh(self) -> None:
        with self._lock:
            if self._clock() - self._checked < self._ttl:
                return
            self._checked = self._clock()
        try:
            raw = self._redis.get(BUSY_KEY)
            busy = set(json.loads(raw)) if raw else set()
        except (RedisError, ValueError):
            busy = set()  # the dispatcher's word is unavailable: publish at once
        try:
            with self._reading() as session:
                found = session.execute(select(QueuePause.tenant_id, QueuePause.queue))
                paused = {(tenant_id, queue) for tenant_id, queue in found}
        except SQLAlchemyError:
            logger.warning("could not read queue pauses", exc_info=True)
            paused = self._paused
        with self._lock:
            self._busy, self._paused = busy, paused
