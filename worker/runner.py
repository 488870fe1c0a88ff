"""Run one delivery of a job: claim it, run its function, finish it."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from celery import Task
from pydantic import BaseModel
from redis import Redis
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from conveyor.errors import JobCancelled, PermanentError, ValidationFailed
from conveyor.jobs import (
    ClaimedJob,
    beat_heartbeats,
    cancel_running_job,
    claim_job,
    fail_job,
    running_attempt,
    succeed_job,
    succeed_job_quietly,
)
from conveyor.logs import bind_context
from conveyor.metrics import JOB_QUEUE_WAIT_SECONDS, JOB_RUN_SECONDS, JOBS_FINISHED
from conveyor.nesting import MAX_JSON_DEPTH, render_path, too_deep
from conveyor.progress import PROGRESS_STATE, progress_meta
from conveyor.registry import JobContext, JobRegistry
from conveyor.settings import Settings
from conveyor.snapshots import BackendResult, note

logger = logging.getLogger(__name__)
# Progress is written at most this often per job, so chatty jobs stay cheap.
PROGRESS_INTERVAL = 0.25
SUCCESS_STATE = "SUCCESS"
# Set in a session's info once it began a database transaction (anything touched the DB).
_BEGAN = "conveyor_began"


def utcnow() -> datetime:
    """Return the current time, timezone-aware."""
    return datetime.now(UTC)


class Heartbeats:
    """One thread per worker process refreshes the heartbeat of the jobs it is running.

    The reaper takes back a running job whose heartbeat goes quiet, so a killed worker,
    an OOM kill or a hard time limit never leaves a job `running` for ever.
    """

    def __init__(self, sessions: sessionmaker[Session], interval: float) -> None:
        self._sessions = sessions
        self._interval = interval
        self._running: set[uuid.UUID] = set()
        self._cancel_requested: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._owner_pid = 0

    @contextmanager
    def running(self, job_id: uuid.UUID) -> Iterator[None]:
        """Keep `job_id`'s heartbeat fresh for the duration of the block."""
        self._ensure_thread()
        with self._lock:
            self._running.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._running.discard(job_id)
                self._cancel_requested.discard(job_id)

    def cancel_requested(self, job_id: uuid.UUID) -> bool:
        """Return whether the last heartbeat learned that someone asked `job_id` to stop."""
        return job_id in self._cancel_requested

    def _ensure_thread(self) -> None:
        # Threads do not survive fork: each pool child starts its own on its first job.
        if self._owner_pid != os.getpid():
            self._owner_pid = os.getpid()
            threading.Thread(target=self._pump, name="conveyor-heartbeat", daemon=True).start()

    def _pump(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                job_ids = list(self._running)
            if not job_ids:
                continue
            try:
                with self._sessions.begin() as session:
                    cancelled = beat_heartbeats(session, job_ids, utcnow())
                with self._lock:
                    self._cancel_requested |= cancelled & self._running
            except SQLAlchemyError:
                logger.warning("could not refresh heartbeats", exc_info=True)


@dataclass
class WorkerServices:
    """What every task in a worker process shares."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    registry: JobRegistry
    # Autocommit, for units of work that are one statement (the claim, a quiet finish): one is
    # atomic by itself, so BEGIN and COMMIT would be two round trips for nothing.
    statements: sessionmaker[Session]
    name: str = field(default_factory=socket.gethostname)
    heartbeats: Heartbeats = field(init=False)
    redis: Redis = field(init=False)

    def __post_init__(self) -> None:
        self.heartbeats = Heartbeats(self.sessions, self.settings.heartbeat_interval)
        if not event.contains(self.sessions, "after_begin", _mark_began):
            event.listen(self.sessions, "after_begin", _mark_began)
        # Connects on first use, so building it in the parent before fork is harmless.
        self.redis = Redis.from_url(self.settings.result_backend, socket_timeout=5)


def _mark_began(session: Session, _transaction: SessionTransaction, _conn: Connection) -> None:
    """Remember that the session began a database transaction: the job used its session."""
    session.info[_BEGAN] = True


class LostOwnership(Exception):
    """Raised to roll back a job's writes when its attempt no longer owns the row."""


@dataclass
class ProgressWriter:
    """Stores a job's progress in the result backend, throttled."""

    task: Task
    job_id: str
    _last: float = 0.0

    def __call__(self, current: int, total: int | None, message: str | None) -> None:
        """Record progress unless the last write was moments ago (the final step always)."""
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL and current != total:
            return
        self._last = now
        try:
            self.task.update_state(
                task_id=self.job_id,
                state=PROGRESS_STATE,
                meta=progress_meta(current, total, message),
            )
        except Exception:  # progress is best effort; the job itself must not fail for it
            logger.warning("could not store progress of job %s", self.job_id, exc_info=True)


class ResultTooLarge(PermanentError):
    """Raised when a job returns more JSON than `max_result_bytes`."""


class ResultTooDeep(PermanentError):
    """Raised when a job returns JSON nested deeper than `MAX_JSON_DEPTH` levels."""


def _as_result(value: BaseModel | dict[str, Any] | None, limit: int) -> dict[str, Any] | None:
    try:
        result = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    except ValueError as exc:  # such as pydantic's own depth limit (~255 levels)
        raise PermanentError(f"the result cannot be serialised as JSON: {exc}") from exc
    if result is not None:
        path = too_deep(result)
        if path is not None:
            raise ResultTooDeep(
                f"the result is nested deeper than {MAX_JSON_DEPTH} levels "
                f"(at {render_path(path, root='result')})"
            )
        size = len(json.dumps(result, separators=(",", ":")))
        if size > limit:
            raise ResultTooLarge(f"the result is {size} bytes; the limit is {limit}")
    return result


def run_job(services: WorkerServices, task: Task, raw_job_id: str) -> str:
    """Claim, run and finish one job; return what happened, for the task's log line."""
    try:
        job_id = uuid.UUID(raw_job_id)
    except ValueError:
        logger.error("dropping message with malformed job id %r", raw_job_id)
        return "malformed"
    with services.statements.begin() as session:
        claimed = claim_job(session, job_id, services.name, utcnow())
    if claimed is None:
        # A redelivery, a duplicate publish, a cancelled or expired job: ack and skip.
        logger.info("job %s is not queued; skipping this delivery", job_id)
        return "skipped"
    job_type = services.registry.get(claimed.type)
    bind_context(tenant_id=claimed.tenant_id, attempt=claimed.attempt)
    if claimed.due_at is not None:
        JOB_QUEUE_WAIT_SECONDS.labels(claimed.type).observe(
            max(0.0, (utcnow() - claimed.due_at).total_seconds())
        )
    started = time.monotonic()
    try:
        with services.heartbeats.running(job_id):
            _run_and_succeed(services, task, claimed)
    except LostOwnership:
        logger.warning("job %s attempt %s lost its claim; rolled back", job_id, claimed.attempt)
        return "lost"
    except JobCancelled:
        with services.sessions.begin() as session:
            cancel_running_job(session, claimed, utcnow())
        JOBS_FINISHED.labels(claimed.type, "cancelled").inc()
        return "cancelled"
    except Exception as exc:
        JOB_RUN_SECONDS.labels(claimed.type).observe(time.monotonic() - started)
        logger.warning("job %s attempt %s raised", job_id, claimed.attempt, exc_info=True)
        with services.sessions.begin() as session:
            outcome = fail_job(
                session,
                claimed,
                public_error(exc),
                utcnow(),
                policy=job_type.retry,
                retryable=not isinstance(exc, ValidationFailed | PermanentError),
            )
        if outcome is not None:
            JOBS_FINISHED.labels(claimed.type, outcome).inc()
        return str(outcome)
    JOB_RUN_SECONDS.labels(claimed.type).observe(time.monotonic() - started)
    JOBS_FINISHED.labels(claimed.type, "succeeded").inc()
    return "succeeded"


def _backend_result(task: Task, job_id: str, result: dict[str, Any] | None) -> list[BackendResult]:
    """Build the document Celery's `store_result` would write for the job's success.

    Noted beside the job's finished snapshot, it goes out in the same pipeline after the
    commit (one round trip instead of the backend's GET, then SETEX and PUBLISH), and
    expires with `result_expires`. Its read-before-write guards a SUCCESS against a late
    duplicate; the ledger's guarded finish already does (only the attempt that succeeded
    the job gets here). Built with the backend's own meta and encoding, so
    `AsyncResult(job_id)` reads it as Celery's own.
    """
    backend = task.backend
    try:
        meta = backend._get_result_meta(
            result=backend.encode_result(result, SUCCESS_STATE),
            state=SUCCESS_STATE,
            traceback=None,
            request=None,
        )
        meta["task_id"] = job_id
        return [
            BackendResult(backend.get_key_for_task(job_id), backend.encode(meta), backend.expires)
        ]
    except Exception:  # the ledger has the result; the backend copy is a convenience
        logger.warning("could not store the result of job %s", job_id, exc_info=True)
        return []


class DatabaseError(Exception):
    """Stands in for a database exception whose text (SQL, parameters, hosts) stays private."""


def public_error(exc: Exception) -> Exception:
    """Return the error as clients may see it: database errors lose their SQL and hosts."""
    if isinstance(exc, SQLAlchemyError):
        return DatabaseError(f"a database error occurred ({type(exc).__name__}); see the logs")
    return exc


def _run_and_succeed(services: WorkerServices, task: Task, claimed: ClaimedJob) -> None:
    """Run the job and succeed it in one transaction: its writes and its success commit together.

    A job that never touched its session has nothing to commit with its success: then the
    finish is one autocommit statement, unless deliveries must commit with it.
    """
    job_type = services.registry.get(claimed.type)
    payload = job_type.parse_payload(claimed.payload)
    committed: list[Callable[[], None]] = []
    with services.sessions.begin() as session:
        ctx = JobContext(
            job_id=claimed.id,
            tenant_id=claimed.tenant_id,
            attempt=claimed.attempt,
            session=session,
            reporter=ProgressWriter(task, str(claimed.id)),
            cancel_requested=partial(services.heartbeats.cancel_requested, claimed.id),
            after_commit=committed.append,
            redis=services.redis,
            settings=services.settings,
        )
        result = _as_result(job_type.func(ctx, payload), services.settings.max_result_bytes)
        session.flush()  # pending objects begin the transaction now, not in the finish
        stored = _backend_result(task, str(claimed.id), result)
        # Untouched, the session's transaction ends with no round trip at all.
        quiet = not (session.info.get(_BEGAN) or claimed.success_delivers)
        if not (quiet and _succeed_quietly(services, claimed, result, stored)):
            if not succeed_job(session, claimed, result, utcnow()):
                raise LostOwnership(str(claimed.id))
            note(session, stored)
    for callback in committed:
        try:
            callback()
        except Exception:  # the job succeeded; a follow-up that fails is logged, not retried
            logger.warning("after-commit step of job %s failed", claimed.id, exc_info=True)


def _succeed_quietly(
    services: WorkerServices,
    claimed: ClaimedJob,
    result: dict[str, Any] | None,
    stored: list[BackendResult],
) -> bool:
    """Succeed the job in one autocommit statement; `False` if that moved nothing.

    Moving nothing means the attempt lost the job or deliveries are due: the caller's
    transaction then finishes it, or finds that it lost.
    """
    with services.statements.begin() as statement:
        if not succeed_job_quietly(statement, claimed, result, utcnow()):
            return False
        note(statement, stored)
    return True


def fail_timed_out(services: WorkerServices, raw_job_id: str, error: Exception) -> None:
    """Count a hard time limit as a failed attempt at once, rather than after the reaper."""
    with services.sessions.begin() as session:
        attempt = running_attempt(session, uuid.UUID(raw_job_id))
        if attempt is None:
            return
        policy = services.registry.get(attempt.type).retry
        outcome = fail_job(session, attempt, error, utcnow(), policy=policy)
    logger.warning("job %s hit its hard time limit: now %s", raw_job_id, outcome)
