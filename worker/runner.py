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

from celery.exceptions import SoftTimeLimitExceeded as CelerySoftTimeLimitExceeded
from celery.exceptions import TimeLimitExceeded as CeleryTimeLimitExceeded
from pydantic import BaseModel
from redis.exceptions import RedisError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from conveyor.errors import (
    DatabaseError,
    JobCancelled,
    LostOwnership,
    PermanentError,
    ResultTooDeep,
    ResultTooLarge,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    ValidationFailed,
)
from conveyor.ledger.gate import SubmitGate
from conveyor.ledger.transitions import (
    ClaimedJob,
    claim,
    fail,
    running_attempt,
    stop,
    succeed,
)
from conveyor.ledger.upkeep import beat_heartbeats
from conveyor.ledger.work import Work
from conveyor.ledger.workflows import fan_out, parent_results
from conveyor.live.store import LiveStore, progress_document
from conveyor.nesting import MAX_JSON_DEPTH, render_path, too_deep
from conveyor.registry import JobContext, JobRegistry
from conveyor.settings import Settings
from conveyor.telemetry.logs import bind_context
from conveyor.telemetry.metrics import JOB_QUEUE_WAIT_SECONDS, JOB_RUN_SECONDS, JOBS_FINISHED
from conveyor.telemetry.tracing import JOB_ATTEMPT, JOB_ID, JOB_OUTCOME, JOB_TYPE, annotate, span

logger = logging.getLogger(__name__)
# Progress is written at most this often per job, so chatty jobs stay cheap.
PROGRESS_INTERVAL = 0.25
# A job still running this long after its claim gets a heartbeat, which shows it `running`.
SHOW_RUNNING_AFTER = 0.25


def utcnow() -> datetime:
    """Return the current time, timezone-aware."""
    return datetime.now(UTC)


class Heartbeats:
    """One thread per worker process refreshes the heartbeat of the jobs it is running.

    The reaper takes back a running job whose heartbeat goes quiet, so a killed worker,
    an OOM kill or a hard time limit never leaves a job `running` for ever. A claim's
    heartbeat also makes it durable (`conveyor.ledger.transitions.PendingViews`): a job
    still running `SHOW_RUNNING_AFTER` seconds after its claim gets an early beat, which
    shows its `running` view; a quicker job's finish shows it instead, at no extra cost.
    """

    def __init__(self, work: Work, interval: float) -> None:
        self._work = work
        self._interval = interval
        self._running: dict[uuid.UUID, tuple[ClaimedJob, float]] = {}
        self._cancel_requested: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._owner_pid = 0

    @contextmanager
    def running(self, job: ClaimedJob) -> Iterator[None]:
        """Keep the claim's heartbeat fresh for the duration of the block."""
        self._ensure_thread()
        with self._lock:
            self._running[job.id] = (job, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(job.id, None)
                self._cancel_requested.discard(job.id)

    def cancel_requested(self, job_id: uuid.UUID) -> bool:
        """Return whether the last heartbeat learned that someone asked `job_id` to stop."""
        return job_id in self._cancel_requested

    def _ensure_thread(self) -> None:
        # Threads do not survive fork: each pool child starts its own on its first job.
        if self._owner_pid != os.getpid():
            self._owner_pid = os.getpid()
            threading.Thread(target=self._pump, name="conveyor-heartbeat", daemon=True).start()

    def show_running(self, job: ClaimedJob) -> None:
        """Make the claim durable and show it now, if it is not shown yet (before progress)."""
        if not job.pending:
            return
        try:
            with self._work.single_statement() as unit:
                beat_heartbeats(unit, [job], utcnow())
        except SQLAlchemyError:  # the next heartbeat or the finish shows it
            logger.warning("could not show job %s running", job.id, exc_info=True)

    def _due(self, everyone: bool) -> list[ClaimedJob]:
        """Return the claims to beat now: all of them, or those whose views still wait."""
        shown_by = time.monotonic() - SHOW_RUNNING_AFTER
        with self._lock:
            return [
                job
                for job, since in self._running.values()
                if everyone or (job.pending and since <= shown_by)
            ]

    def _pump(self) -> None:
        tick = min(self._interval, SHOW_RUNNING_AFTER)
        last = time.monotonic()
        while True:
            time.sleep(tick)
            everyone = time.monotonic() - last >= self._interval
            if everyone:
                last = time.monotonic()
            claims = self._due(everyone)
            if not claims:
                continue
            try:
                with self._work.single_statement() as unit:
                    cancelled = beat_heartbeats(unit, claims, utcnow())
                with self._lock:
                    self._cancel_requested |= cancelled & self._running.keys()
            except SQLAlchemyError:
                logger.warning("could not refresh heartbeats", exc_info=True)


@dataclass
class WorkerServices:
    """What every task in a worker process shares."""

    settings: Settings
    engine: Engine
    work: Work
    registry: JobRegistry
    # Whether a job submitted here (a schedule's) may go straight to the broker.
    gate: SubmitGate
    name: str = field(default_factory=socket.gethostname)
    heartbeats: Heartbeats = field(init=False)

    def __post_init__(self) -> None:
        self.heartbeats = Heartbeats(self.work, self.settings.heartbeat_interval)

    @property
    def live(self) -> LiveStore:
        """Return the store of live job views and progress."""
        assert self.work.live is not None, "a worker's units of work write live views"
        return self.work.live


@dataclass
class ProgressWriter:
    """Stores a job's progress for the API to show, throttled."""

    live: LiveStore
    job_id: uuid.UUID
    # Shows the job `running` first: a progress report never precedes its claim's view.
    show_running: Callable[[], None] = lambda: None
    _last: float = 0.0

    def __call__(self, current: int, total: int | None, message: str | None) -> None:
        """Record progress unless the last write was moments ago (the final step always)."""
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL and current != total:
            return
        self._last = now
        self.show_running()
        try:
            self.live.set_progress(self.job_id, progress_document(current, total, message))
        except RedisError:  # progress is best effort; the job itself must not fail for it
            logger.warning("could not store progress of job %s", self.job_id, exc_info=True)


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


def run_job(services: WorkerServices, raw_job_id: str) -> str:
    """Claim, run and finish one job; return what happened, for the task's log line."""
    try:
        job_id = uuid.UUID(raw_job_id)
    except ValueError:
        logger.error("dropping message with malformed job id %r", raw_job_id)
        return "malformed"
    # Spans of the claim, the job's function and the finish, inside the Celery
    # instrumentor's run span (conveyor.telemetry.tracing); no-ops while tracing is off.
    with span("conveyor.claim", {JOB_ID: raw_job_id}), services.work.single_statement() as unit:
        claimed = claim(unit, job_id, services.name, utcnow())
    if claimed is None:
        # A redelivery, a duplicate publish, a cancelled or expired job: ack and skip.
        logger.info("job %s is not queued; skipping this delivery", job_id)
        annotate({JOB_OUTCOME: "skipped"})
        return "skipped"
    outcome = _run_claimed(services, claimed)
    annotate({JOB_ID: raw_job_id, JOB_TYPE: claimed.type, JOB_OUTCOME: outcome})
    return outcome


def _run_claimed(services: WorkerServices, claimed: ClaimedJob) -> str:
    """Run a claimed job and finish it; return what happened."""
    job_id = claimed.id
    job_type = services.registry.get(claimed.type)
    bind_context(tenant_id=claimed.tenant_id, attempt=claimed.attempt)
    JOB_QUEUE_WAIT_SECONDS.labels(claimed.type).observe(
        max(0.0, (utcnow() - claimed.due_at).total_seconds())
    )
    started = time.monotonic()
    try:
        with services.heartbeats.running(claimed):
            _run_and_succeed(services, claimed)
    except LostOwnership:
        logger.warning("job %s attempt %s lost its claim; rolled back", job_id, claimed.attempt)
        return "lost"
    except JobCancelled:
        with span("conveyor.finish", {JOB_OUTCOME: "cancelled"}), services.work.begin() as unit:
            stop(unit, claimed, utcnow())
        JOBS_FINISHED.labels(claimed.type, "cancelled").inc()
        return "cancelled"
    except Exception as exc:
        JOB_RUN_SECONDS.labels(claimed.type).observe(time.monotonic() - started)
        logger.warning("job %s attempt %s raised", job_id, claimed.attempt, exc_info=True)
        with span("conveyor.finish"), services.work.begin() as unit:
            outcome = fail(
                unit,
                claimed,
                public_error(exc),
                utcnow(),
                policy=job_type.retry,
                retryable=not isinstance(exc, ValidationFailed | PermanentError),
            )
            annotate({JOB_OUTCOME: str(outcome)})
        if outcome is not None:
            JOBS_FINISHED.labels(claimed.type, outcome).inc()
        return str(outcome)
    JOB_RUN_SECONDS.labels(claimed.type).observe(time.monotonic() - started)
    JOBS_FINISHED.labels(claimed.type, "succeeded").inc()
    return "succeeded"


def public_error(exc: Exception) -> Exception:
    """Return the error as clients may see it: database errors lose their SQL and hosts.

    A job's own exceptions pass as they are; Celery's time limits become the tree's errors
    of the same name, with a message that says what happened.
    """
    if isinstance(exc, SQLAlchemyError):
        return DatabaseError(f"a database error occurred ({type(exc).__name__}); see the logs")
    if isinstance(exc, CeleryTimeLimitExceeded):
        limit = f" of {exc.args[0]}s" if exc.args else ""
        return TimeLimitExceeded(f"the job ran past its hard time limit{limit} and was killed")
    if isinstance(exc, CelerySoftTimeLimitExceeded):
        return SoftTimeLimitExceeded("the job ran past its soft time limit")
    return exc


def _run_and_succeed(services: WorkerServices, claimed: ClaimedJob) -> None:
    """Run the job and succeed it in one unit of work: its writes and its success commit together.

    The success inserts the job's webhook deliveries in its own statement, so they commit
    with it too.
    """
    job_type = services.registry.get(claimed.type)
    payload = job_type.parse_payload(claimed.payload)
    attributes: dict[str, str | int] = {
        JOB_ID: str(claimed.id),
        JOB_TYPE: claimed.type,
        JOB_ATTEMPT: claimed.attempt,
    }
    with services.work.begin() as unit:
        with span("conveyor.run", attributes):
            ctx = JobContext(
                job_id=claimed.id,
                tenant_id=claimed.tenant_id,
                attempt=claimed.attempt,
                session=unit.session,
                reporter=ProgressWriter(
                    services.live,
                    claimed.id,
                    partial(services.heartbeats.show_running, claimed),
                ),
                cancel_requested=partial(services.heartbeats.cancel_requested, claimed.id),
                after_commit=unit.after_commit,
                redis=services.live.redis,
                settings=services.settings,
                dependency_results=partial(parent_results, unit.session, claimed.id),
            )
            result = _as_result(job_type.func(ctx, payload), services.settings.max_result_bytes)
            unit.session.flush()  # the job's own writes fail its attempt here, not its success
        quiet = not (ctx.added or unit.used or claimed.has_dependents or claimed.workflow_id)
        if quiet and _succeed_alone(services, claimed, result):
            return  # the unit has no transaction; its after-commit steps run as it closes
        # The success's statement (and the jobs it added); the unit's COMMIT follows, in the
        # run span.
        with span("conveyor.finish", {JOB_OUTCOME: "succeeded"}):
            if ctx.added:
                # Added last: the workflow's row is locked from here to the commit, not the run.
                fan_out(
                    unit,
                    services.registry,
                    claimed,
                    ctx.added,
                    default_queue=services.settings.default_queue,
                    now=utcnow(),
                    gate=services.gate,
                )
            if not succeed(unit, claimed, result, utcnow()):
                raise LostOwnership(str(claimed.id))


def _succeed_alone(
    services: WorkerServices, claimed: ClaimedJob, result: dict[str, Any] | None
) -> bool:
    """Succeed a job that wrote nothing in one autocommit statement; `False` if it could not.

    A quiet job's unit never began a transaction, so BEGIN and COMMIT would be two round
    trips around this one statement, which is atomic alone (its deliveries, unique key and
    limit slots are its CTEs). A job with dependents or in a workflow is left to the
    transactional finish (`succeed(alone=True)` moves nothing then), as is one whose claim
    was lost: that finish raises `LostOwnership`.
    """
    finish = span("conveyor.finish", {JOB_OUTCOME: "succeeded"})
    with finish, services.work.single_statement() as unit:
        return succeed(unit, claimed, result, utcnow(), alone=True)


def fail_timed_out(services: WorkerServices, raw_job_id: str, error: Exception) -> None:
    """Count a hard time limit as a failed attempt at once, rather than after the reaper."""
    with services.work.begin() as unit:
        attempt = running_attempt(unit, uuid.UUID(raw_job_id))
        if attempt is None:
            return
        policy = services.registry.get(attempt.type).retry
        outcome = fail(unit, attempt, public_error(error), utcnow(), policy=policy)
    logger.warning("job %s hit its hard time limit: now %s", raw_job_id, outcome)
