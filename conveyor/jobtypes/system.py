"""Platform job types used to exercise and probe a deployment."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from conveyor.errors import JobFailed, PermanentError
from conveyor.registry import JobContext, RetryPolicy, job_type


class NoopPayload(BaseModel):
    """`system.noop` takes nothing."""

    model_config = ConfigDict(extra="forbid")


class SleepPayload(BaseModel):
    """`system.sleep` waits this many seconds."""

    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=3600)


class FailPayload(BaseModel):
    """`system.fail` fails with this message, for good or until some attempt."""

    model_config = ConfigDict(extra="forbid")
    message: str = Field(default="failed on purpose", max_length=1000)
    permanent: bool = False
    succeed_on_attempt: int | None = Field(default=None, ge=1, le=100)


class SleepResult(BaseModel):
    """What `system.sleep` returns."""

    slept: float


@job_type("system.noop", payload=NoopPayload)
def noop(ctx: JobContext, payload: NoopPayload) -> None:
    """Do nothing; measures the platform's own overhead."""


@job_type(
    "system.sleep",
    payload=SleepPayload,
    result=SleepResult,
    soft_time_limit=3660,
    time_limit=3700,
)
def sleep(ctx: JobContext, payload: SleepPayload) -> SleepResult:
    """Sleep in small steps, reporting progress after each."""
    started = time.monotonic()
    steps = max(1, min(100, int(payload.seconds * 10)))
    for step in range(1, steps + 1):
        time.sleep(payload.seconds / steps)
        ctx.progress(step, steps, f"slept {step * payload.seconds / steps:.1f}s")
    return SleepResult(slept=round(time.monotonic() - started, 3))


@job_type("system.fail", payload=FailPayload, retry=RetryPolicy(max_attempts=1))
def fail(ctx: JobContext, payload: FailPayload) -> dict[str, int]:
    """Fail with the given message (never retried if permanent), or succeed on a given attempt."""
    if payload.succeed_on_attempt is not None and ctx.attempt >= payload.succeed_on_attempt:
        return {"attempt": ctx.attempt}
    raise (PermanentError if payload.permanent else JobFailed)(payload.message)
