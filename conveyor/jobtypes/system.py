"""Platform job types used to exercise and probe a deployment."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from conveyor.errors import JobFailed
from conveyor.registry import JobContext, job_type


class NoopPayload(BaseModel):
    """`system.noop` takes nothing."""

    model_config = ConfigDict(extra="forbid")


class SleepPayload(BaseModel):
    """`system.sleep` waits this many seconds."""

    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=3600)


class FailPayload(BaseModel):
    """`system.fail` fails with this message."""

    model_config = ConfigDict(extra="forbid")
    message: str = Field(default="failed on purpose", max_length=1000)


class SleepResult(BaseModel):
    """What `system.sleep` returns."""

    slept: float


@job_type("system.noop", payload=NoopPayload)
def noop(ctx: JobContext, payload: NoopPayload) -> None:
    """Do nothing; measures the platform's own overhead."""


@job_type("system.sleep", payload=SleepPayload, soft_time_limit=3660, time_limit=3700)
def sleep(ctx: JobContext, payload: SleepPayload) -> SleepResult:
    """Sleep in small steps, reporting progress after each."""
    started = time.monotonic()
    steps = max(1, min(100, int(payload.seconds * 10)))
    for step in range(1, steps + 1):
        time.sleep(payload.seconds / steps)
        ctx.report_progress(step, steps)
    return SleepResult(slept=round(time.monotonic() - started, 3))


@job_type("system.fail", payload=FailPayload)
def fail(ctx: JobContext, payload: FailPayload) -> None:
    """Fail every attempt with the given message."""
    raise JobFailed(payload.message)
