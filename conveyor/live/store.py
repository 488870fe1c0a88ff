"""The one owner of Conveyor's job keys in Redis: each job's live view and its progress.

A job's view (`conveyor:view:<id>`, a hash of its version, tenant and JSON document) is
written after every ledger write that changes it commits, versioned by the job row's
`version` column. Writes of one job are serialised by its row lock, so versions grow in
commit order, and a Lua script keeps only a newer version: a writer that lost a race can
never bring an older state back. A deleted job's view takes `GONE`, above every version;
a version without a document is a tombstone that sends the next read to the ledger, which
fills it in at that version.

A view carries its tenant; a read for another tenant ignores it, so isolation stays the
ledger's. A failed write deletes the keys; when Redis is unreachable for that too, the
process retries the writes with its next write or read (until then its reads go to the
ledger). A running job's progress (`conveyor:progress:<id>`) is written by its worker and
read beside the view in one pipelined round trip (`queue_read`), which another round trip
may carry (`Prefetched`: the rate limiter's).

Conveyor does not use Celery's result backend: results live in the ledger, and these keys
are Conveyor's own (DESIGN.md).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from conveyor.live.events import encode_progress, encode_views, events_channel

logger = logging.getLogger(__name__)

VIEW_PREFIX = "conveyor:view:"
PROGRESS_PREFIX = "conveyor:progress:"
# Above any version (Lua numbers are doubles: exact up to 2**53).
GONE = 2**53
# Unwritten views a process keeps for a retry while Redis is unreachable.
MAX_RETRIES = 100_000

# Overwrite only with a newer version, or fill a tombstone (no document) with the document
# of its own version; a tombstone keeps only the version.
_WRITE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'v'))
local version = tonumber(ARGV[1])
if current and current > version then return 0 end
if current == version and (ARGV[4] == '' or redis.call('HEXISTS', KEYS[1], 'doc') == 1) then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[4] == '' then
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 't', ARGV[3], 'doc', ARGV[4])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def view_key(job_id: uuid.UUID) -> str:
    """Return the Redis key of a job's live view."""
    return f"{VIEW_PREFIX}{job_id}"


def progress_key(job_id: uuid.UUID) -> str:
    """Return the Redis key of a running job's latest progress report."""
    return f"{PROGRESS_PREFIX}{job_id}"


@dataclass(frozen=True)
class LiveView:
    """One job's view as of `version`, or a tombstone when `doc` is `None`."""

    job_id: uuid.UUID
    version: int
    tenant_id: uuid.UUID | None = None
    doc: str | None = None
    # The `job_events` row of the transition that made this view, if a transition did.
    event_id: int | None = None

    @classmethod
    def of(
        cls,
        job_id: uuid.UUID,
        version: int,
        tenant_id: uuid.UUID,
        view: dict[str, Any],
        event_id: int | None = None,
    ) -> LiveView:
        """Return the live view of a job's client view (`ledger.views.job_view`) at `version`."""
        doc = json.dumps(view, separators=(",", ":"))
        return cls(job_id, version, tenant_id, doc, event_id)


def queue_read(pipe: Pipeline, job_id: uuid.UUID) -> None:
    """Queue the reads of a job's view and its progress, for `Prefetched` or `LiveStore.read`."""
    pipe.hmget(view_key(job_id), ["t", "doc"])
    pipe.get(progress_key(job_id))


@dataclass(frozen=True)
class Prefetched:
    """What Redis answered to `queue_read` for a job, read in another round trip (unparsed)."""

    job_id: uuid.UUID
    replies: Sequence[Any]

    def usable_for(self, job_id: uuid.UUID) -> Sequence[Any] | None:
        """Return the replies if they are `job_id`'s and none of them is an error."""
        if self.job_id != job_id or any(isinstance(r, Exception) for r in self.replies):
            return None
        return self.replies


def progress_document(current: int, total: int | None, message: str | None) -> dict[str, Any]:
    """Build the progress report a worker stores and the API shows."""
    percent = round(100 * current / total, 1) if total else None
    return {"current": current, "total": total, "percent": percent, "message": message}


def _parse_progress(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        progress = json.loads(raw)
    except ValueError:
        return None
    return progress if isinstance(progress, dict) else None


@dataclass(frozen=True)
class Found:
    """A live view as read: the job's client view and its progress, or neither."""

    view: dict[str, Any]
    progress: dict[str, Any] | None


class LiveStore:
    """Writes and reads job views and progress in Redis."""

    def __init__(self, redis: Redis, ttl: int) -> None:
        self._redis = redis
        self._ttl = ttl
        self._channel = events_channel(redis)
        self._write = redis.register_script(_WRITE)
        # Views whose write failed while Redis was unreachable, retried later.
        self._retries: list[LiveView] = []

    @property
    def redis(self) -> Redis:
        """Return the Redis client the views live in."""
        return self._redis

    def write(self, views: Sequence[LiveView]) -> None:
        """Store the views, each only if newer than what is there; never raises."""
        # Writes that failed earlier go first: the version guard makes a late one harmless.
        batch = [*self._take_retries(), *views]
        if not batch:
            return
        try:
            try:
                self._send(batch)
            except NoScriptError:
                # Redis restarted or flushed its scripts: load ours, then the same writes
                # again (the version guard makes a repeat harmless).
                self._redis.script_load(_WRITE)
                self._send(batch)
        except RedisError:
            # A view that missed its update must not be served: drop them all, so the poll
            # reads the ledger.
            logger.warning("could not write %d job views", len(batch), exc_info=True)
            try:
                self._redis.delete(*(view_key(v.job_id) for v in batch))
            except RedisError:
                # Redis is unreachable, and may come back with the old views (AOF, a
                # partition): retry these with this process's next write or read. Lost if
                # the process dies meanwhile; the TTL bounds that.
                self._keep_for_retry(batch)

    def _send(self, batch: Sequence[LiveView]) -> None:
        # EVALSHA by hand: a redis-py Script in a pipeline costs a SCRIPT EXISTS round trip
        # before every pipeline; the script is loaded once, and again only when Redis lost it.
        with self._redis.pipeline(transaction=False) as pipe:
            for view in batch:
                pipe.evalsha(
                    self._write.sha,
                    1,
                    view_key(view.job_id),
                    str(view.version),
                    self._ttl,
                    str(view.tenant_id or ""),
                    view.doc or "",
                )
            # The changes go to the API's streams and long polls in the same round trip
            # (after the commit, like the views): `conveyor.live.events`.
            pipe.publish(self._channel, encode_views(batch))
            pipe.execute()

    def _take_retries(self) -> list[LiveView]:
        retries, self._retries = self._retries, []
        return retries

    def _keep_for_retry(self, views: Sequence[LiveView]) -> None:
        kept = [*self._retries, *views]
        if len(kept) > MAX_RETRIES:
            logger.error("dropping %d unwritten job views", len(kept) - MAX_RETRIES)
        self._retries = kept[-MAX_RETRIES:]

    def set_progress(self, job_id: uuid.UUID, progress: dict[str, Any]) -> None:
        """Store a running job's latest progress report and announce it (`RedisError` if not)."""
        document = json.dumps(progress, separators=(",", ":"))
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(progress_key(job_id), document, ex=self._ttl)
            pipe.publish(self._channel, encode_progress(job_id, document))
            pipe.execute()

    def version(self, job_id: uuid.UUID) -> int | None:
        """Return the version of a job's live view, if it has one (`RedisError` if unreachable)."""
        raw = self._redis.hget(view_key(job_id), "v")
        return int(raw) if raw is not None else None

    def progress(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        """Return a job's latest progress report, if any (raises `RedisError` when it cannot)."""
        return _parse_progress(self._redis.get(progress_key(job_id)))

    def read(
        self, job_id: uuid.UUID, tenant_id: uuid.UUID, prefetched: Prefetched | None = None
    ) -> Found | None:
        """Return the tenant's job view and its progress, or `None` to read the ledger.

        `None` when there is no usable view (absent, a tombstone, another tenant's job, or
        Redis unreachable). `prefetched` (this job's `queue_read` replies, sent in another
        round trip) saves the read; Redis is read without it, or when it is another job's
        or holds an error.
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
                logger.warning("live view of job %s unavailable", job_id, exc_info=True)
                return None
        (owner, doc), progress_raw = replies
        if doc is None or owner is None or owner.decode() != str(tenant_id):
            return None
        return Found(json.loads(doc), _parse_progress(progress_raw))
