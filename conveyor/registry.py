"""The job-type registry: one function and one decorator make a job type."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from redis import Redis
from sqlalchemy.orm import Session

from conveyor.errors import JobCancelled, UnknownJobType, ValidationFailed
from conveyor.settings import Settings


class ProgressReporter(Protocol):
    """Receives a running job's progress; the worker sends it to the result backend."""

    def __call__(self, current: int, total: int | None, message: str | None) -> None:
        """Record that `current` of `total` units are done."""


@dataclass(frozen=True)
class JobContext:
    """What a job function gets besides its payload."""

    job_id: uuid.UUID
    tenant_id: uuid.UUID
    attempt: int
    session: Session
    reporter: ProgressReporter
    cancel_requested: Callable[[], bool] = lambda: False
    # Run a callable after the job's success commits (cache invalidation, notifications).
    after_commit: Callable[[Callable[[], None]], None] = lambda _: None
    # The result-backend Redis, for jobs that maintain caches the API reads.
    redis: Redis | None = None
    settings: Settings | None = None
    # The jobs this one depends on, by ref (or id): their state and result.
    dependency_results: Callable[[], dict[str, dict[str, Any]]] = dict
    # Jobs this one adds to its workflow (fan-out), submitted with its success.
    added: list[Any] = field(default_factory=list)

    @property
    def dependencies(self) -> dict[str, dict[str, Any]]:
        """Return the jobs this one depends on, by ref (or id), with their state and result."""
        return self.dependency_results()

    def add_jobs(self, *jobs: Any) -> None:
        """Add jobs to this job's workflow once it succeeds (`WorkflowJob`s or their dicts).

        Their `depends_on` may name refs already in the workflow (this job's own among
        them) or refs added here, which is how a fan-out gets its fan-in: the jobs and
        their edges commit with this job's success, and if it fails none of them exist.
        """
        self.added.extend(jobs)

    def progress(self, current: int, total: int | None = None, message: str | None = None) -> None:
        """Report progress; raise `JobCancelled` here if someone asked the job to stop."""
        if self.cancel_requested():
            raise JobCancelled("cancelled on request")
        self.reporter(current, total, message)

    def cancelled(self) -> bool:
        """Return whether someone asked this job to stop (for jobs that poll instead)."""
        return self.cancel_requested()


JobFunction = Callable[[JobContext, Any], BaseModel | dict[str, Any] | None]


@dataclass(frozen=True)
class RetryPolicy:
    """How often a job type runs before it fails, and how long it waits in between."""

    max_attempts: int = 1
    backoff_base: float = 2.0
    backoff_cap: float = 300.0


@dataclass(frozen=True)
class TypeLimit:
    """A limit a job type declares in code: it holds its jobs of every tenant together.

    For a shared resource (an API key of the platform's own, a licence seat count):
    at most `max_running` at once, starts spaced to `per_second` (a rate window).
    """

    max_running: int | None = None
    per_second: float | None = None


@dataclass(frozen=True)
class JobType:
    """A registered job type: its function, models and execution policy."""

    name: str
    func: JobFunction
    payload_model: type[BaseModel]
    result_model: type[BaseModel] | None = None
    queue: str | None = None
    # Further queues a submitter may pick for this type (the first is `queue`).
    extra_queues: tuple[str, ...] = ()
    priority: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    soft_time_limit: float | None = None
    time_limit: float | None = None
    cancellable: bool = True
    # Platform-only (webhook deliveries): submitted by Conveyor itself, never by a client.
    internal: bool = False
    # Holds this type's jobs of every tenant to one limit (a shared resource).
    limit: TypeLimit | None = None

    def queues(self, default_queue: str) -> tuple[str, ...]:
        """Return the queues this type may run on, its own first."""
        return (self.queue or default_queue, *self.extra_queues)

    def parse_payload(self, payload: Any) -> BaseModel:
        """Validate `payload` against the type's model, naming each wrong field."""
        try:
            return self.payload_model.model_validate(payload)
        except ValidationError as exc:
            errors = [
                {
                    "field": ".".join(["payload", *(str(p) for p in err["loc"])]),
                    "message": err["msg"],
                }
                for err in exc.errors(include_url=False, include_input=False)
            ]
            raise ValidationFailed(f"payload does not match {self.name}", errors=errors) from exc


class JobRegistry:
    """Maps job-type names to their definitions."""

    def __init__(self) -> None:
        self._types: dict[str, JobType] = {}

    def job_type(
        self,
        name: str,
        *,
        payload: type[BaseModel],
        result: type[BaseModel] | None = None,
        queue: str | None = None,
        extra_queues: tuple[str, ...] = (),
        priority: int = 0,
        retry: RetryPolicy | None = None,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        cancellable: bool = True,
        internal: bool = False,
        limit: TypeLimit | None = None,
    ) -> Callable[[JobFunction], JobFunction]:
        """Register the decorated function as job type `name` (`internal`: platform-only)."""

        def decorate(func: JobFunction) -> JobFunction:
            if name in self._types:
                raise ValueError(f"job type {name!r} is registered twice")
            self._types[name] = JobType(
                name=name,
                func=func,
                payload_model=payload,
                result_model=result,
                queue=queue,
                extra_queues=extra_queues,
                priority=priority,
                retry=retry or RetryPolicy(),
                soft_time_limit=soft_time_limit,
                time_limit=time_limit,
                cancellable=cancellable,
                internal=internal,
                limit=limit,
            )
            return func

        return decorate

    def get(self, name: str) -> JobType:
        """Return the job type called `name`, or raise `UnknownJobType`."""
        try:
            return self._types[name]
        except KeyError:
            raise unknown_job_type(name) from None

    def __contains__(self, name: object) -> bool:
        """Return whether a job type of that name is registered."""
        return name in self._types

    def __iter__(self) -> Iterator[JobType]:
        """Iterate over every registered job type, internal ones too, in name order."""
        return iter(sorted(self._types.values(), key=lambda jt: jt.name))

    def public(self) -> Iterator[JobType]:
        """Iterate over the job types clients may submit (and see listed), in name order."""
        return (jt for jt in self if not jt.internal)

    def is_internal(self, name: str) -> bool:
        """Return whether `name` is a registered internal type (its payloads are not for all)."""
        found = self._types.get(name)
        return found is not None and found.internal


def unknown_job_type(name: str) -> UnknownJobType:
    """Return the error for a type a caller may not submit, whether it is missing or internal."""
    return UnknownJobType(
        f"there is no job type {name!r}",
        errors=[{"field": "type", "message": f"unknown job type {name!r}"}],
    )


registry = JobRegistry()
job_type = registry.job_type


def load_job_types(modules: Iterable[str]) -> JobRegistry:
    """Import the modules that define job types and return the filled registry."""
    for module in modules:
        importlib.import_module(module)
    return registry
