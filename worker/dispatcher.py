"""The dispatcher, in beat: one leader hands waiting jobs to the broker (conveyor.ledger.dispatch).

It runs on a thread of its own, under an advisory lock of its own (a second beat waits
and takes over once the leader's connection is gone), so a slow housekeeping task never
holds dispatch up. It passes whenever the ledger says work or room appeared (PostgreSQL
notifications on `conveyor_dispatch`: a job left to it at submit, a slot freed, a limit
raised, a queue resumed), every `BUSY_TICK` seconds while a queue is busy, and every
`IDLE_TICK` seconds otherwise. After each pass it announces the busy queues, so submits
leave their jobs to it while it hands out turns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import psycopg
from celery import Celery
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from conveyor.broker.inspect import queue_depths
from conveyor.ledger.dispatch import Pass, dispatch, waiting_queues
from conveyor.ledger.flow import sync_type_limits
from conveyor.ledger.gate import announce_busy
from conveyor.ledger.statements import DISPATCH_CHANNEL
from conveyor.queues import broker_depths
from conveyor.telemetry.metrics import JOBS_DISPATCHED
from worker.leadership import Leadership
from worker.pace import Pace
from worker.runner import WorkerServices, utcnow

logger = logging.getLogger(__name__)
# pg_advisory_lock key of the dispatcher: the housekeeper's, plus one.
DISPATCH_LOCK_KEY = 0x636F6E766579 + 1
BUSY_TICK = 0.05
IDLE_TICK = 1.0
COALESCE = 0.01


@dataclass
class Dispatcher:
    """Runs dispatcher passes on demand, or on its own thread while this beat leads."""

    services: WorkerServices
    app: Celery
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    # Per queue, the tenant served first in the last pass: the next one starts after it.
    _after: dict[str, uuid.UUID] = field(default_factory=dict)
    _redis: Redis | None = None
    # Per queue, how fast its workers take messages (so how many the broker should hold).
    _paces: defaultdict[str, Pace] = field(default_factory=lambda: defaultdict(Pace))

    @classmethod
    def for_app(cls, app: Celery) -> Dispatcher:
        """Build a dispatcher publishing through the worker app."""
        return cls(app.conveyor, app)

    @property
    def redis(self) -> Redis:
        """Return the Redis client of the broker (when it is Redis) and of the busy flag."""
        if self._redis is None:
            self._redis = Redis.from_url(self.services.settings.broker, socket_timeout=5)
        return self._redis

    def depths(self, queues: list[str]) -> dict[str, int | None]:
        """Return how many messages each queue holds in the broker (None: unknown)."""
        if not queues:
            return {}
        if self.services.settings.amqp_broker:
            return broker_depths(self.app, queues)
        try:
            return dict(queue_depths(self.redis, queues))
        except RedisError:  # the broker is down: publish nothing until it says how full it is
            logger.warning("queue depths unavailable: the broker did not answer", exc_info=True)
            return dict.fromkeys(queues)

    def run_once(self) -> Pass:
        """Make one pass: publish what may start, announce the busy queues; return the pass."""
        settings = self.services.settings
        with self.services.work.begin() as unit:
            queues = waiting_queues(unit)
            depths = self.depths(queues)
            clock = time.monotonic()
            rooms = {
                queue: 0
                if depth is None
                else self._paces[queue].room(clock, depth, settings.dispatch_in_flight)
                for queue, depth in depths.items()
            }
            done = dispatch(
                unit,
                utcnow(),
                rooms=rooms,
                per_tenant=settings.dispatch_per_tenant,
                after=self._after,
            )
        for queue, depth in depths.items():
            if depth is not None:
                self._paces[queue].published(clock, depth, done.by_queue[queue])
        self._after.update(done.first)
        announce_busy(self.live_redis, done.busy)
        for queue, count in done.by_queue.items():
            JOBS_DISPATCHED.labels(queue).inc(count)
        return done

    @property
    def live_redis(self) -> Redis:
        """Return the Redis the submitting processes read the busy flag from."""
        return self.services.live.redis

    def sync_limits(self) -> None:
        """Bring the job types' limits declared in code into the ledger."""
        with self.services.work.begin() as unit:
            sync_type_limits(unit, self.services.registry, utcnow())

    def start(self) -> None:
        """Pass on a daemon thread while this beat leads dispatch."""
        self._thread = threading.Thread(target=self._loop, name="conveyor-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop after its current pass, wait for it, and give up the lead."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        leadership = Leadership(self.services, DISPATCH_LOCK_KEY, "dispatch")
        listener: psycopg.Connection | None = None
        synced = False
        try:
            while not self._stop.is_set():
                if not leadership.hold():
                    self._stop.wait(IDLE_TICK)
                    continue
                try:
                    if not synced:
                        self.sync_limits()
                        synced = True
                    listener = listener or self._listen()
                    busy = bool(self.run_once().busy)
                except (SQLAlchemyError, psycopg.Error, RedisError, OSError):  # an outage
                    logger.warning("dispatcher pass failed", exc_info=True)
                    _close(listener)
                    listener, busy = None, False
                except Exception:  # a bug must not end dispatch for the deployment: log, go on
                    logger.exception("dispatcher pass crashed")
                    busy = False
                listener = self._wait(listener, BUSY_TICK if busy else IDLE_TICK)
        finally:
            _close(listener)
            leadership.release()

    def _listen(self) -> psycopg.Connection:
        url = self.services.engine.url.set(drivername="postgresql")
        conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        conn.execute(f"LISTEN {DISPATCH_CHANNEL}")
        return conn

    def _wait(
        self, listener: psycopg.Connection | None, timeout: float
    ) -> psycopg.Connection | None:
        """Sleep until the ledger notifies (or `timeout`); return the listener still usable."""
        if listener is None:
            self._stop.wait(timeout)
            return None
        try:
            woken = sum(1 for _ in listener.notifies(timeout=timeout, stop_after=1))
            if woken:
                # A busy ledger notifies on every finish: what comes within a few
                # milliseconds makes one pass, not one each. Drained before the pass, so a
                # notification during the pass still wakes the next one.
                self._stop.wait(COALESCE)
                for _ in listener.notifies(timeout=0):
                    pass
        except psycopg.Error:
            logger.warning("lost the dispatcher's notifications; polling", exc_info=True)
            _close(listener)
            return None
        return listener


def _close(listener: psycopg.Connection | None) -> None:
    if listener is not None:
        with contextlib.suppress(psycopg.Error):
            listener.close()
