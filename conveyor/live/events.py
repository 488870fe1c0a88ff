"""Job changes as they commit, for the API's streams and long polls: one channel, one hub.

Every write of live views (`LiveStore.write`, after the unit of work's commit) publishes one
message on the channel `conveyor:events:<db>` listing the changed jobs: id, tenant, version,
the `job_events` id of the transition that made the view (if one did) and the view itself.
A worker's progress report publishes one too. A rollback publishes nothing, so a stream
never shows a state that did not commit.

Redis pub/sub is fire-and-forget: a process that was not listening misses messages. So a
subscriber is told when it may have missed some (the hub reconnected, or its own buffer
overflowed) through `Subscription.behind`, and the stream then reads what it missed from
`job_events`, the ledger's durable history, by id.

Each API process holds ONE subscription (`Hub`) and fans its messages out in memory to its
streams and long polls: a redis-py pool stops at 100 connections and each `PubSub` holds one
(shared/PITFALLS.md). The channel carries the Redis database number because pub/sub ignores
databases: two deployments on one Redis must not hear each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from conveyor.live.store import LiveView

logger = logging.getLogger(__name__)

# Changes a subscriber may hold unread; past that it is `behind` and reads the ledger.
BUFFER = 1000
# The name of the hub's connection in Redis's CLIENT LIST.
HUB_CLIENT = "conveyor-events"


def events_channel(redis: Redis) -> str:
    """Return the pub/sub channel of job changes for the Redis database `redis` uses."""
    db = redis.connection_pool.connection_kwargs.get("db", 0)
    return f"conveyor:events:{db}"


def encode_views(views: Sequence[LiveView]) -> str:
    """Encode committed view changes as one message (the views' JSON is embedded as is)."""
    parts = []
    for view in views:
        tenant = f'"{view.tenant_id}"' if view.tenant_id is not None else "null"
        event = str(view.event_id) if view.event_id is not None else "null"
        parts.append(
            f'{{"j":"{view.job_id}","t":{tenant},"v":{view.version},'
            f'"e":{event},"d":{view.doc or "null"}}}'
        )
    return "[" + ",".join(parts) + "]"


def encode_progress(job_id: uuid.UUID, progress: str) -> str:
    """Encode a running job's progress report (JSON) as one message."""
    return f'[{{"j":"{job_id}","p":{progress}}}]'


@dataclass(frozen=True)
class Change:
    """One job's change as published: a new view (maybe a transition's) or a progress report."""

    job_id: uuid.UUID
    tenant_id: uuid.UUID | None = None
    version: int | None = None
    event_id: int | None = None
    view: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None


def decode(message: bytes | str) -> list[Change]:
    """Parse one message of the channel; a malformed one is logged and yields nothing."""
    try:
        entries = json.loads(message)
        return [
            Change(
                uuid.UUID(entry["j"]),
                uuid.UUID(entry["t"]) if entry.get("t") else None,
                entry.get("v"),
                entry.get("e"),
                entry.get("d"),
                entry.get("p"),
            )
            for entry in entries
        ]
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring a malformed job change message")
        return []


class Subscription:
    """The changes of one job, or of one tenant's transitions, as one stream receives them."""

    def __init__(self, job_id: uuid.UUID | None, tenant_id: uuid.UUID | None) -> None:
        self.job_id = job_id
        self.tenant_id = tenant_id
        self._changes: deque[Change] = deque()
        self._ready = threading.Event()
        # Set when changes may have been missed: the stream reads the ledger, then clears it.
        self.behind = False
        # Set once the subscriber has read (or may have read) the ledger: from then on a
        # reconnection of the hub can hide changes from it.
        self.settled = False

    def put(self, change: Change) -> None:
        """Hand a change over (the hub's thread); a full buffer makes the subscriber `behind`."""
        if len(self._changes) >= BUFFER:
            self.behind = True
        else:
            self._changes.append(change)
        self._ready.set()

    def fell_behind(self) -> None:
        """Mark that changes may have been missed, and wake the subscriber to catch up."""
        self.behind = True
        self._ready.set()

    def get(self, timeout: float) -> list[Change]:
        """Return the changes received since the last call, waiting up to `timeout` for one."""
        self._ready.wait(timeout)
        self._ready.clear()
        changes = []
        while self._changes:
            changes.append(self._changes.popleft())
        return changes


class Hub:
    """One process's subscription to the channel, fanned out to its subscribers in memory."""

    def __init__(self, redis: Redis, *, retry_seconds: float = 1.0) -> None:
        self._redis = redis
        self._channel = events_channel(redis)
        self._retry = retry_seconds
        self._lock = threading.Lock()
        self._by_job: dict[uuid.UUID, set[Subscription]] = {}
        self._by_tenant: dict[uuid.UUID, set[Subscription]] = {}
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._closing = False

    @property
    def listening(self) -> bool:
        """Return whether the subscription is up (else subscribers must read the ledger)."""
        return self._listening.is_set()

    @property
    def closing(self) -> bool:
        """Return whether the process is stopping: streams end, clients resume elsewhere."""
        return self._closing

    def close(self) -> None:
        """End every stream and long poll of this process (it was asked to stop)."""
        self._closing = True
        self._everyone_behind()

    @contextlib.contextmanager
    def subscribe(
        self, *, job_id: uuid.UUID | None = None, tenant_id: uuid.UUID | None = None
    ) -> Iterator[Subscription]:
        """Receive one job's changes, or a tenant's transitions, until the block ends.

        Subscribe BEFORE reading the ledger: a change committed between the read and the
        subscription would otherwise be missed.
        """
        subscription = Subscription(job_id, tenant_id)
        self._start()
        with self._lock:
            if job_id is not None:
                self._by_job.setdefault(job_id, set()).add(subscription)
            if tenant_id is not None:
                self._by_tenant.setdefault(tenant_id, set()).add(subscription)
        # A subscriber that starts while the hub connects reads the ledger once it is up;
        # if the hub is not up in time, it reads the ledger again when it is.
        if not self._listening.wait(2.0):
            subscription.behind = True
        subscription.settled = True
        try:
            yield subscription
        finally:
            with self._lock:
                for index, key in ((self._by_job, job_id), (self._by_tenant, tenant_id)):
                    if key is not None and key in index:
                        index[key].discard(subscription)
                        if not index[key]:
                            del index[key]

    def subscribers(self) -> int:
        """Return how many subscriptions this process holds (for tests and metrics)."""
        with self._lock:
            return sum(len(s) for s in self._by_job.values()) + sum(
                len(s) for s in self._by_tenant.values()
            )

    def _start(self) -> None:
        # Started by the first subscriber, in the process that serves it (after any fork).
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="job-events", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self._listen()
            except Exception:
                # Whatever broke the subscription (redis-py raises ValueError, not a
                # RedisError, on a socket closed under it), the thread must live on: a dead
                # hub would leave every stream of this process silent.
                logger.warning("job change subscription lost; reconnecting", exc_info=True)
            self._listening.clear()
            self._everyone_behind()
            time.sleep(self._retry)

    def _listen(self) -> None:
        pubsub = self._redis.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._channel)
            # Listening only once Redis confirmed the SUBSCRIBE: a change published before
            # that would be missed by a subscriber that already read the ledger.
            deadline = time.monotonic() + 10.0
            while (message := pubsub.get_message(timeout=1.0)) is None or message.get(
                "type"
            ) != "subscribe":
                if time.monotonic() > deadline:
                    raise RedisError("no confirmation of the job change subscription")
            # Whoever read the ledger while the hub was down may have missed changes; marked
            # before `listening` is set, so a subscriber still waiting for it (it reads the
            # ledger only after) is not sent back to the ledger for nothing.
            self._everyone_behind(settled_only=True)
            self._listening.set()
            quiet = 0.0
            while True:
                message = pubsub.get_message(timeout=5.0)
                if message is None:
                    # A silently dead connection shows only when written to.
                    quiet += 5.0
                    if quiet >= 30.0:
                        pubsub.ping()
                        quiet = 0.0
                elif message.get("type") == "message":
                    quiet = 0.0
                    self._deliver(decode(message["data"]))
                elif message.get("type") == "subscribe":
                    # redis-py reconnected and subscribed again by itself: what was
                    # published in between is lost to pub/sub, so everyone reads the ledger.
                    logger.info("job change subscription restored")
                    self._everyone_behind()
        finally:
            pubsub.close()

    def _deliver(self, changes: list[Change]) -> None:
        with self._lock:
            targets = [(change, list(self._by_job.get(change.job_id, ()))) for change in changes]
            # A tenant's stream carries transitions only (a change with an event id).
            targets += [
                (change, list(self._by_tenant.get(change.tenant_id, ())))
                for change in changes
                if change.tenant_id is not None and change.event_id is not None
            ]
        for change, subscribers in targets:
            for subscriber in subscribers:
                subscriber.put(change)

    def _everyone_behind(self, *, settled_only: bool = False) -> None:
        with self._lock:
            everyone = {s for subs in self._by_job.values() for s in subs}
            everyone |= {s for subs in self._by_tenant.values() for s in subs}
        for subscriber in everyone:
            if subscriber.settled or not settled_only:
                subscriber.fell_behind()
