"""What a submitting process knows, within a moment, of paused and busy queues.

A queued job goes straight to the broker (the fastest path) unless its queue is paused
for its tenant or everyone, the dispatcher is handing the queue out by turns because it
is busy (jobs waiting, or the broker's room full), or the queue is no longer shallow.
The dispatcher says which queues are busy in one Redis key with a short expiry, rewritten
every pass: when it stops, the key expires and submits publish directly again.

Shallow means the broker holds fewer than `in_flight` messages for the queue, counting
those this process published since it last looked: so a burst (a batch of 1,000, a
flood of submits between two dispatcher passes) puts at most `in_flight` jobs ahead of
another tenant's, and the rest wait for the dispatcher's turns. On Redis the depth is
read with the busy key, in the same round trip; on RabbitMQ, which the gate does not
ask, only this process's own publishes count.

Every answer is cached per process for `ttl` seconds; a stale answer costs at most a job
published into a pause (its claim sends it back) or a few jobs ahead of their turn,
never a limit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from conveyor.broker.inspect import queue_depths
from conveyor.ledger.states import Waiting
from conveyor.models import QueuePause
from conveyor.settings import Settings

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
        in_flight: int,
        broker: Redis | None = None,
        ttl: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._broker = broker
        self._reading = reading
        self._in_flight = in_flight
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._checked = -float("inf")
        self._paused: set[tuple[uuid.UUID | None, str]] = set()
        self._busy: set[str] = set()
        # Per queue: the broker's depth when last read, and what this process sent since.
        self._depths: dict[str, int] = {}
        self._sent: Counter[str] = Counter()

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        redis: Redis,
        reading: Callable[[], AbstractContextManager[Session]],
    ) -> SubmitGate:
        """Build the gate of a process: `redis` holds the busy key (and the queues, if shared)."""
        broker = None
        if not settings.amqp_broker:
            same = settings.broker == settings.result_backend
            broker = redis if same else Redis.from_url(settings.broker, socket_timeout=2)
        return cls(redis, reading, in_flight=settings.dispatch_in_flight, broker=broker)

    def holds(self, tenant_id: uuid.UUID, queue: str) -> Waiting | None:
        """Return why a job of the tenant in `queue` waits for the dispatcher, or None.

        None counts the job as published: call it once per job about to go to the broker.
        """
        self._refresh()
        with self._lock:
            if (None, queue) in self._paused or (tenant_id, queue) in self._paused:
                return Waiting.PAUSE
            self._depths.setdefault(queue, 0)
            if queue in self._busy or self._depths[queue] + self._sent[queue] >= self._in_flight:
                return Waiting.FAIR_SHARE
            self._sent[queue] += 1
            return None

    def _refresh(self) -> None:
        with self._lock:
            if self._clock() - self._checked < self._ttl:
                return
            self._checked = self._clock()
            queues = list(self._depths)
        busy, depths = self._read_redis(queues)
        try:
            with self._reading() as session:
                found = session.execute(select(QueuePause.tenant_id, QueuePause.queue))
                paused = {(tenant_id, queue) for tenant_id, queue in found}
        except SQLAlchemyError:
            logger.warning("could not read queue pauses", exc_info=True)
            paused = self._paused
        with self._lock:
            self._busy, self._paused = busy, paused
            self._depths.update(depths)
            self._sent.clear()

    def _read_redis(self, queues: list[str]) -> tuple[set[str], dict[str, int]]:
        """Return the busy queues, and the depth of `queues` when the broker is Redis.

        An unavailable answer counts as "publish at once": the dispatcher or the broker is
        down, and the submit's own publish will find out.
        """
        try:
            raw = self._redis.get(BUSY_KEY)
            busy = set(json.loads(raw)) if raw else set()
            if self._broker is None or not queues:
                return busy, {}
            return busy, queue_depths(self._broker, queues)
        except (RedisError, ValueError):
            return set(), dict.fromkeys(queues, 0)
