"""What the queues hold and who works them: the broker's depth, the ledger's view, live workers.

Shared by `GET /v1/queues` (one tenant's view: its own jobs' counts and ids) and the API's
`/metrics` (the deployment's). Nothing here runs on a submit, claim or poll path: each call
costs a few broker round trips, one or two queries and one broadcast.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from celery import Celery
from kombu.exceptions import ChannelError, OperationalError
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import func, literal_column, select
from sqlalchemy.orm import Session

from conveyor.ledger.states import JobState
from conveyor.models import Job

logger = logging.getLogger(__name__)
# The latest broadcast's answer, shared by every API instance, and who is refreshing it.
WORKERS_KEY = "conveyor:workers:latest"
WORKERS_LOCK = "conveyor:workers:refreshing"
# Literal states, not parameters: a prepared statement's generic plan can then still prove
# the partial index `ix_jobs_tenant_active_queue` applies.
_ACTIVE = Job.state.in_([literal_column("'queued'"), literal_column("'running'")])


@dataclass(frozen=True)
class QueueStats:
    """One queue: messages waiting in the broker and the ledger's view of its jobs."""

    name: str
    depth: int | None  # None when the broker could not be asked
    queued: int
    oldest_queued_at: datetime | None
    running: int

    def oldest_age(self, now: datetime) -> float | None:
        """Return how many seconds the oldest queued job has waited, if any waits."""
        if self.oldest_queued_at is None:
            return None
        return max(0.0, (now - self.oldest_queued_at).total_seconds())


@dataclass(frozen=True)
class WorkerInfo:
    """A Celery worker that answered, and the job ids it is running now."""

    name: str
    active_job_ids: list[str]


def ledger_queue_stats(
    session: Session, tenant_id: uuid.UUID | None = None
) -> dict[str, tuple[int, datetime | None, int]]:
    """Return, per queue with unfinished work, (queued, oldest queued-since, running).

    Of one tenant's jobs when `tenant_id` is given, else of every tenant's (operators' metrics).
    """
    queued = Job.state == JobState.QUEUED
    # A job queued after a delay or a retry has waited since it fell due, not since created.
    since = func.coalesce(Job.scheduled_for, Job.created_at)
    query = select(
        Job.queue,
        func.count().filter(queued),
        func.min(since).filter(queued),
        func.count().filter(Job.state == JobState.RUNNING),
    ).where(_ACTIVE)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    rows = session.execute(query.group_by(Job.queue)).all()
    return {queue: (n_queued, oldest, running) for queue, n_queued, oldest, running in rows}


def broker_depths(app: Celery, queues: Iterable[str]) -> dict[str, int | None]:
    """Return the messages waiting in each queue, asked of the broker itself.

    A passive declare is how AMQP reports a queue's size; kombu's Redis transport answers
    it with `LLEN` summed over the queue's priority lists. A queue the broker has never
    seen holds nothing.
    """
    depths: dict[str, int | None] = {}
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=0)
            for queue in queues:
                # A failed passive declare closes its AMQP channel: one channel per queue.
                with conn.channel() as channel:
                    try:
                        depths[queue] = int(
                            channel.queue_declare(queue, passive=True).message_count
                        )
                    except ChannelError:
                        depths[queue] = 0
    except (OperationalError, RedisError, OSError):
        logger.warning("queue depths unavailable: the broker did not answer", exc_info=True)
    return {queue: depths.get(queue) for queue in queues}


def online_workers(app: Celery, timeout: float) -> list[WorkerInfo]:
    """Broadcast one `inspect active` and return every worker that answered in time."""
    try:
        replies = app.control.inspect(timeout=timeout).active() or {}
    except (OperationalError, RedisError, OSError):
        logger.warning("workers unavailable: the broker did not answer", exc_info=True)
        return []
    return [
        WorkerInfo(name, sorted(str(task["id"]) for task in tasks or []))
        for name, tasks in sorted(replies.items())
    ]


def recent_workers(app: Celery, redis: Redis, timeout: float, max_age: float) -> list[WorkerInfo]:
    """Return the workers of a broadcast at most `max_age` seconds old, without waiting on one.

    A broadcast waits its whole `timeout` for answers, too long for a page that refreshes
    every few seconds. The latest answer is kept in Redis for every API instance; when it
    is older than `max_age`, one caller (a Redis lock) asks again in the background while
    everyone is shown the previous answer. Only the very first caller waits. Without
    Redis, every call broadcasts.
    """
    try:
        raw = redis.get(WORKERS_KEY)
        latest = json.loads(raw) if raw else None
        if latest is not None and time.time() - latest["at"] < max_age:
            return _workers_of(latest)
        if not redis.set(WORKERS_LOCK, "1", nx=True, ex=max(1, int(timeout) + 2)):
            return _workers_of(latest) if latest else []
    except (RedisError, ValueError, KeyError, TypeError):
        logger.warning("the workers' latest answer is unavailable", exc_info=True)
        return online_workers(app, timeout)

    def refresh() -> list[WorkerInfo]:
        workers = online_workers(app, timeout)
        answer = {"at": time.time(), "workers": [[w.name, w.active_job_ids] for w in workers]}
        try:
            redis.set(WORKERS_KEY, json.dumps(answer), ex=300)
            redis.delete(WORKERS_LOCK)
        except RedisError:
            logger.warning("could not keep the workers' answer", exc_info=True)
        return workers

    if latest is None:
        return refresh()
    threading.Thread(target=refresh, name="conveyor-workers", daemon=True).start()
    return _workers_of(latest)


def _workers_of(latest: dict[str, object]) -> list[WorkerInfo]:
    listed = latest["workers"]
    assert isinstance(listed, list)
    return [WorkerInfo(str(name), [str(i) for i in ids]) for name, ids in listed]


def _job_id(task_id: str) -> uuid.UUID | None:
    """Return the job id a task id stands for (a job's task is named by its job id)."""
    try:
        return uuid.UUID(task_id)
    except ValueError:
        return None  # some other task: nobody's job


def tenant_workers(
    session: Session, workers: list[WorkerInfo], tenant_id: uuid.UUID
) -> list[WorkerInfo]:
    """Return the workers with only the tenant's jobs among their running ids (one query)."""
    running = {_job_id(task_id) for worker in workers for task_id in worker.active_job_ids}
    running.discard(None)
    mine: set[uuid.UUID | None] = set()
    if running:
        mine.update(
            session.scalars(select(Job.id).where(Job.id.in_(running), Job.tenant_id == tenant_id))
        )
    return [
        WorkerInfo(w.name, [task_id for task_id in w.active_job_ids if _job_id(task_id) in mine])
        for w in workers
    ]


def queue_overview(
    session: Session,
    app: Celery,
    known_queues: Iterable[str],
    tenant_id: uuid.UUID | None = None,
) -> list[QueueStats]:
    """Return stats for every known queue and every queue the ledger has work in.

    With `tenant_id`, the ledger's counts are that tenant's; the broker's depth is the queue's.
    """
    ledger = ledger_queue_stats(session, tenant_id)
    names = sorted(set(known_queues) | ledger.keys())
    depths = broker_depths(app, names)
    return [QueueStats(name, depths[name], *ledger.get(name, (0, None, 0))) for name in names]
