"""The job-type registry: one function and one decorator make a job type."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from conveyor.errors import UnknownJobType, ValidationFailed


class ProgressReporter(Protocol):
    """Receives a running job's progress; the worker sends it to the result backend."""

    def __call__(self, done: int, total: int | None = None, message: str | None = None) -> None:
        """Record that `done` of `total` units are finished."""


@dataclass(frozen=True)
class JobContext:
    """What a job function gets besides its payload."""

    job_id: uuid.UUID
    tenant_id: uuid.UUID
    attempt: int
    session: Session
    report_progress: ProgressReporter


JobFunction = Callable[[JobContext, Any], BaseModel | dict[str, Any] | None]


@dataclass(frozen=True)
class JobType:
    """A registered job type: its function, payload model and execution policy."""

    name: str
    func: JobFunction
    payload_model: type[BaseModel]
    queue: str | None = None
    max_attempts: int = 1
    soft_time_limit: float | None = None
    time_limit: float | None = None

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
        queue: str | None = None,
        max_attempts: int = 1,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
    ) -> Callable[[JobFunction], JobFunction]:
        """Register the decorated function as job type `name`."""

        def decorate(func: JobFunction) -> JobFunction:
            if name in self._types:
                raise ValueError(f"job type {name!r} is registered twice")
            self._types[name] = JobType(
                name, func, payload, queue, max_attempts, soft_time_limit, time_limit
            )
            return func

        return decorate

    def get(self, name: str) -> JobType:
        """Return the job type called `name`, or raise `UnknownJobType`."""
        try:
            return self._types[name]
        except KeyError:
            raise UnknownJobType(
                f"there is no job type {name!r}",
                errors=[{"field": "type", "message": f"unknown job type {name!r}"}],
            ) from None

    def __iter__(self) -> Iterator[JobType]:
        """Iterate over the registered job types in name order."""
        return iter(sorted(self._types.values(), key=lambda jt: jt.name))


registry = JobRegistry()
job_type = registry.job_type


def load_job_types(modules: Iterable[str]) -> JobRegistry:
    """Import the modules that define job types and return the filled registry."""
    for module in modules:
        importlib.import_module(module)
    return registry
