"""Job state snapshots in Redis: the status poll's fast path, the ledger its fallback.

Every transition notes a snapshot in its session; after the commit the session factory
writes them (one pipelined round trip of `EVALSHA`s). A snapshot is versioned by the id
of the job's latest event (`job_events.id` comes from a sequence, and transitions of one
job are serialised by its row lock, so ids grow in transition order), and a Lua script
keeps only a newer version: writers that lose a race can never bring an older state back.

Versions, for the job's latest event id `v`:
- `v`: the document is exactly the row as of that event (submit, claim, finish, a fill
  from the ledger);
- `v - 0.5`: a tombstone from a transition that had no row at hand (cancel, retry,
  promote, expire): it blocks every older writer, and the next ledger read fills in `v`;
- `v + 0.5`: a change without an event (a cancel request on a running job);
- `GONE`: the job was deleted; nothing may bring it back.

A snapshot carries its tenant, and a read for another tenant ignores it, so isolation
stays the ledger's. A failed write deletes the keys; when Redis is unreachable for that
too, the process retries the writes with its next write or read (until then its reads
go to the ledger). A failed read falls back to the ledger. Progress is not copied here:
it stays in the Celery result backend, on the same Redis, and the poll reads both in
one pipelined round trip (`queue_read`): the rate limiter's own when it counts on that
Redis too, handing the replies to the read (a `SnapshotReply`). A job's final
result-backend document may be noted beside its snapshot and goes out in the same
pipeline (best effort: the ledger has the result).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from conveyor.models import Job
from conveyor.progress import RESULT_KEY_PREFIX, parse_progress, read_progress
from conveyor.queries import get_job_versioned
from conveyor.states import JobState
from conveyor.views import JobOut, with_eta

logger = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "conveyor:job:"
# Above any event id (Lua numbers are doubles: exact up to 2**53).
GONE = float(2**53)
_PENDING = "conveyor_snapshots"
_SAVEPOINTS = "conveyor_snapshot_savepoints"
# Unwritten snapshots a process keeps for a retry while Redis is unreachable.
MAX_RETRIES = 100_000

# Overwrite only with a newer version; a tombstone (no document) keeps only the version.
_WRITE = """
local current = redis.call('HGET', KEYS[1], 'v')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[4] == '' then
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 't', ARGV[3], 'doc', ARGV[4])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def snapshot_key(job_id: uuid.UUID) -> str:
    """Return the Redis key of a job's snapshot."""
    return f"{SNAPSHOT_PREFIX}{job_id}"


def queue_read(pipe: Pipeline, job_id: uuid.UUID) -> None:
    """Queue the reads of a job's snapshot and its live progress, for a `SnapshotReply`."""
    pipe.hmget(snapshot_key(job_id), ["t", "doc"])
    pipe.get(f"{RESULT_KEY_PREFIX}{job_id}")


@dataclass(frozen=True)
class SnapshotReply:
    """What Redis answered to `queue_read` for a job, read in another pipeline (unparsed)."""

    job_id: uuid.UUID
    replies: Sequence[Any]

    def usable_for(self, job_id: uuid.UUID) -> Sequence[Any] | None:
        """Return the replies if they are `job_id`'s and none of them is an error."""
        if self.job_id != job_id or any(isinstance(r, Exception) for r in self.replies):
            return None
        return self.replies


@dataclass(frozen=True)
class Snapshot:
    """One job's state as of `version`, or a tombstone when `doc` is `None`."""

    job_id: uuid.UUID
    version: float
    tenant_id: uuid.UUID | None = None
    doc: str | None = None

    @classmethod
    def of(cls, job: Job, version: float) -> Snapshot:
        """Return the snapshot of a ledger row as of `version`."""
        # With `progress: null` in its place: a read fills it in without moving the keys,
        # so the body (and its ETag) is byte for byte what the ledger path answers.
        view = JobOut.of(job).model_dump(mode="json")
        return cls.of_view(job.id, version, job.tenant_id, view)

    @classmethod
    def of_view(
        cls, job_id: uuid.UUID, version: float, tenant_id: uuid.UUID, view: dict[str, Any]
    ) -> Snapshot:
        """Return the snapshot of a job's client view (`JobOut`'s JSON dump) as of `version`."""
        return cls(job_id, version, tenant_id, json.dumps(view, separators=(",", ":")))


@dataclass(frozen=True)
class BackendResult:
    """A task's document in the Celery result backend, stored and announced as Celery does.

    Celery's Redis backend SETs the key with its TTL and PUBLISHes the same value to the
    key's channel (for a waiting `AsyncResult.get()`).
    """

    key: bytes | str
    value: bytes | str
    ttl: int | None


Pending = Snapshot | BackendResult


def note(session: Session, writes: Iterable[Pending]) -> None:
    """Queue snapshots (and result documents) to be written once `session` commits.

    Dropped on rollback.
    """
    session.info.setdefault(_PENDING, []).extend(writes)


def note_tombstones(session: Session, versions: Iterable[tuple[uuid.UUID, int]]) -> None:
    """Invalidate the snapshots of jobs whose transition (event id given) had no row at hand."""
    note(session, (Snapshot(job_id, event_id - 0.5) for job_id, event_id in versions))


def _version_text(version: float) -> str:
    return str(int(version)) if version == int(version) else repr(version)


class SnapshotStore:
    """Writes and reads job snapshots in Redis (the result backend's instance)."""

    def __init__(self, redis: Redis, ttl: int) -> None:
        self._redis = redis
        self._ttl = ttl
        self._write = redis.register_script(_WRITE)
        # Snapshots whose write failed while Redis was unreachable, retried later.
        self._retries: list[Snapshot] = []

    @property
    def redis(self) -> Redis:
        """Return the Redis client the snapshots live in (the result backend's)."""
        return self._redis

    def attach(self, factory: sessionmaker[Session]) -> None:
        """Write every session's noted snapshots after its commit; forget them on rollback."""
        event.listen(factory, "after_commit", self._after_commit)
        event.listen(factory, "after_transaction_create", _mark_savepoint)
        event.listen(factory, "after_soft_rollback", _roll_back)
        event.listen(factory, "after_transaction_end", _forget)

    def _after_commit(self, session: Session) -> None:
        pending: list[Pending] = session.info.pop(_PENDING, [])
        if pending:
            self.write(pending)

    def write(self, writes: Sequence[Pending]) -> None:
        """Store the snapshots, each only if newer than what is there; never raises.

        Result documents go in the same pipeline; if it fails they are dropped, not retried.
        """
        # Writes that failed earlier go first: the version guard makes a late one harmless.
        batch = [*self._take_retries(), *writes]
        try:
            try:
                self._send(batch)
            except NoScriptError:
                # Redis restarted or flushed its scripts: load ours, then the same writes
                # again (the version guard makes a repeat harmless).
                self._redis.script_load(_WRITE)
                self._send(batch)
        except RedisError:
            # A snapshot that missed its update must not be served: drop them all, so the
            # poll reads the ledger.
            logger.warning("could not write %d job snapshots", len(batch), exc_info=True)
            snapshots = [s for s in batch if isinstance(s, Snapshot)]
            if not snapshots:
                return
            try:
                self._redis.delete(*(snapshot_key(s.job_id) for s in snapshots))
            except RedisError:
                # Redis is unreachable, and may come back with the old snapshots (AOF, a
                # partition): retry these with this process's next write or read. Lost
                # if the process dies meanwhile; the TTL bounds that.
                self._keep_for_retry(snapshots)

    def _send(self, batch: Sequence[Pending]) -> None:
        # EVALSHA by hand: a redis-py Script in a pipeline costs a SCRIPT EXISTS round trip
        # before every pipeline; the script is loaded once, and again only when Redis lost it.
        with self._redis.pipeline(transaction=False) as pipe:
            for snap in batch:
                if isinstance(snap, BackendResult):
                    pipe.set(snap.key, snap.value, ex=snap.ttl or None)
                    pipe.publish(snap.key, snap.value)
                    continue
                pipe.evalsha(
                    self._write.sha,
                    1,
                    snapshot_key(snap.job_id),
                    _version_text(snap.version),
                    self._ttl,
                    str(snap.tenant_id or ""),
                    snap.doc or "",
                )
            pipe.execute()

    def _take_retries(self) -> list[Snapshot]:
        retries, self._retries = self._retries, []
        return retries

    def _keep_for_retry(self, snapshots: Sequence[Snapshot]) -> None:
        kept = [*self._retries, *snapshots]
        if len(kept) > MAX_RETRIES:
            logger.error("dropping %d unwritten job snapshots", len(kept) - MAX_RETRIES)
        self._retries = kept[-MAX_RETRIES:]

    def read(
        self, job_id: uuid.UUID, tenant_id: uuid.UUID, prefetched: SnapshotReply | None = None
    ) -> dict[str, Any] | None:
        """Return the job's public view from its snapshot, live progress included, or `None`.

        `None` when there is no usable snapshot (absent, a tombstone, another tenant's
        job, or Redis unreachable): the caller reads the ledger. `prefetched` (this job's
        `queue_read` replies, sent in another round trip) saves the read; Redis is read
        without it, or when it is another job's or holds an error.
        """
        if self._retries:
            self.write([])
            if self._retries:
                return None  # still unreachable: the ledger answers
            prefetched = None  # read before the retried writes landed: maybe older
        replies = prefetched.usable_for(job_id) if prefetched is not None else None
        if replies is None:
            try:
                with self._redis.pipeline(transaction=False) as pipe:
                    queue_read(pipe, job_id)
                    replies = pipe.execute()
            except RedisError:
                logger.warning("snapshot of job %s unavailable", job_id, exc_info=True)
                return None
        (owner, doc), progress_raw = replies
        if doc is None or owner is None or owner.decode() != str(tenant_id):
            return None
        view: dict[str, Any] = json.loads(doc)
        progress = None
        if view["state"] == JobState.RUNNING and progress_raw is not None:
            started = view.get("started_at")
            progress = with_eta(
                parse_progress(progress_raw), datetime.fromisoformat(started) if started else None
            )
        view["progress"] = progress
        return view


def read_job_view(
    store: SnapshotStore,
    reads: sessionmaker[Session],
    job_id: uuid.UUID,
    tenant_id: uuid.UUID,
    prefetched: SnapshotReply | None = None,
) -> dict[str, Any]:
    """Return the tenant's job as clients see it: from its snapshot, else from the ledger.

    A ledger read stores what it read as the snapshot (versioned by the latest event it
    saw, so a newer snapshot written meanwhile wins). `NotFound` for another tenant's job.
    `prefetched`, the snapshot already read, is checked as `SnapshotStore.read` checks one.
    """
    view = store.read(job_id, tenant_id, prefetched)
    if view is not None:
        return view
    with reads() as session:
        job, version = get_job_versioned(session, job_id, tenant_id)
    store.write([Snapshot.of(job, version)])
    progress = None
    if job.state == JobState.RUNNING:
        try:
            progress = read_progress(store.redis, job.id)
        except RedisError:
            logger.warning("progress of job %s unavailable", job.id, exc_info=True)
    return JobOut.of(job, progress).model_dump(mode="json")


def _mark_savepoint(session: Session, transaction: SessionTransaction) -> None:
    # Remember how many snapshots were noted when a savepoint began, to drop the ones
    # noted inside it if it rolls back while the unit of work goes on to commit.
    if transaction.nested:
        session.info.setdefault(_SAVEPOINTS, {})[transaction] = len(session.info.get(_PENDING, []))


def _roll_back(session: Session, previous_transaction: SessionTransaction) -> None:
    if previous_transaction.nested:
        mark = session.info.get(_SAVEPOINTS, {}).pop(previous_transaction, None)
        if mark is not None:
            del session.info.get(_PENDING, [])[mark:]
    elif previous_transaction.parent is None:
        session.info.pop(_PENDING, None)


def _forget(session: Session, transaction: SessionTransaction) -> None:
    # Only the root: SQLAlchemy also ends savepoints (before their after_soft_rollback)
    # and inner subtransactions here.
    if transaction.parent is None:
        # The unit of work is over (written after its commit, or rolled back).
        session.info.pop(_PENDING, None)
        session.info.pop(_SAVEPOINTS, None)
