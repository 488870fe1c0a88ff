"""Test-only job types for the chaos suite; loaded through CONVEYOR_JOB_MODULES by its processes.

`chaos.count` counts its successful completions in PostgreSQL, in the same transaction as the
job's own success, so "lost" and "ran twice" are facts in the database, not in logs. Every
start and end of a run is also written on a connection of its own (committed at once), so the
suite can see two runs of one job overlapping in time.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text

from conveyor.registry import JobContext, RetryPolicy, job_type

SCHEMA = """
CREATE TABLE IF NOT EXISTS chaos_completions (
    key text PRIMARY KEY,
    job_id uuid NOT NULL,
    completions integer NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS chaos_runs (
    id bigserial PRIMARY KEY,
    job_id uuid NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
"""


class CountPayload(BaseModel):
    """Sleep `seconds`, then count one completion under `key` (the job id when absent)."""

    model_config = ConfigDict(extra="forbid")
    key: str | None = Field(default=None, min_length=1, max_length=200)
    seconds: float = Field(default=0.0, ge=0, le=600)


class PoisonPayload(BaseModel):
    """How to misbehave: raise an unpicklable error, or kill the process running the job."""

    model_config = ConfigDict(extra="forbid")
    mode: str = Field(pattern="^(raise|exit)$")


class Unpicklable(Exception):
    """Raised by the poison job: holds a lock, which no serializer can carry."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = __import__("threading").Lock()


def _record_run(ctx: JobContext) -> int:
    """Write the start of a run on its own connection, committed at once; return its id."""
    engine = ctx.session.get_bind()
    with engine.begin() as conn:  # type: ignore[union-attr]
        return int(
            conn.execute(
                text(
                    "INSERT INTO chaos_runs (job_id, attempt, pid) VALUES (:j, :a, :p) RETURNING id"
                ),
                {"j": ctx.job_id, "a": ctx.attempt, "p": os.getpid()},
            ).scalar_one()
        )


def _finish_run(ctx: JobContext, run_id: int) -> None:
    engine = ctx.session.get_bind()
    with engine.begin() as conn:  # type: ignore[union-attr]
        conn.execute(
            text("UPDATE chaos_runs SET finished_at = clock_timestamp() WHERE id = :id"),
            {"id": run_id},
        )


@job_type(
    "chaos.count",
    payload=CountPayload,
    retry=RetryPolicy(max_attempts=20, backoff_base=0.2, backoff_cap=1.0),
    time_limit=50,
)
def count(ctx: JobContext, payload: CountPayload) -> dict[str, str]:
    """Sleep, then count one completion in the job's own transaction."""
    key = payload.key or str(ctx.job_id)
    run_id = _record_run(ctx)
    deadline = time.monotonic() + payload.seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    ctx.session.execute(
        text(
            "INSERT INTO chaos_completions (key, job_id) VALUES (:k, :j) "
            "ON CONFLICT (key) DO UPDATE SET completions = chaos_completions.completions + 1"
        ),
        {"k": key, "j": ctx.job_id},
    )
    _finish_run(ctx, run_id)
    return {"key": key}


@job_type(
    "chaos.poison", payload=PoisonPayload, retry=RetryPolicy(max_attempts=2, backoff_base=0.1)
)
def poison(ctx: JobContext, payload: PoisonPayload) -> None:
    """Misbehave as asked."""
    if payload.mode == "exit":
        os._exit(1)  # the pool child dies mid-job, as under the OOM killer
    raise Unpicklable("poisoned on purpose")
