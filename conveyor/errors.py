"""One exception tree: what went wrong, never how HTTP says it.

Each error carries what happened (`detail`, field `errors`, facts such as `retry_after`);
`api.errors` alone decides its status, title and problem type. A job's `error.type` shows
clients the class name of the error that ended its attempt, so the names here are part of
the API: `WorkerLost`, `TimeLimitExceeded`, `DatabaseError`, `PermanentError`, …
"""

from __future__ import annotations

from typing import Any


class ConveyorError(Exception):
    """Raised when Conveyor itself reports a failure; the base of the tree."""

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


# What a request can run into.


class MalformedRequest(ConveyorError):
    """Raised when a request body is not valid JSON."""


class UnsupportedMediaType(ConveyorError):
    """Raised when a JSON endpoint receives another content type."""


class ValidationFailed(ConveyorError):
    """Raised when a request or payload does not match its model."""


class UnknownJobType(ValidationFailed):
    """Raised when a job names a type that is not registered."""


class UnstorableData(ValidationFailed):
    """Raised when a request holds a value the database cannot store (a NUL character, say)."""


class Unauthorized(ConveyorError):
    """Raised when a request carries no valid credentials."""


class Forbidden(ConveyorError):
    """Raised when the caller's role does not allow the action (within its own tenant)."""


class NotFound(ConveyorError):
    """Raised when an object does not exist or belongs to another tenant."""


class Conflict(ConveyorError):
    """Raised when a request conflicts with the current state (a taken email, a job's state)."""


class StorageQuotaExceeded(ConveyorError):
    """Raised when an upload would take the tenant's stored files past its storage quota."""


class RateLimited(ConveyorError):
    """Raised when a caller sent more requests than its rate limit allows; retry later."""

    def __init__(
        self,
        detail: str,
        *,
        retry_after: int,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail, errors=errors)
        # Whole seconds until a retry can succeed.
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """Raised when a tenant's unfinished jobs would exceed its quota; retry when they drain."""


class ServiceUnavailable(ConveyorError):
    """Raised when a dependency (database, broker) cannot be reached."""

    def __init__(
        self,
        detail: str,
        *,
        retry_after: int | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail, errors=errors)
        # Whole seconds after which a retry may succeed, when there is a sensible guess.
        self.retry_after = retry_after


class PublishFailed(ServiceUnavailable):
    """Raised when the broker did not take (or may not have taken) a batch of messages."""


# What ends a job's attempt; the class name becomes the job's `error.type`.


class JobFailed(ConveyorError):
    """Raised when a job's attempt fails with a clear message (retried if attempts remain)."""


class PermanentError(JobFailed):
    """Raised when a job fails in a way no retry can fix: it fails at once."""


class ResultTooLarge(PermanentError):
    """Raised when a job returns more JSON than `max_result_bytes`."""


class ResultTooDeep(PermanentError):
    """Raised when a job returns JSON nested deeper than `MAX_JSON_DEPTH` levels."""


class WorkerLost(JobFailed):
    """Raised when a job's worker stopped mid-job (killed, out of memory); the reaper fails it."""


class TimeLimitExceeded(JobFailed):
    """Raised when a job ran past its hard time limit and the process running it was killed."""


class SoftTimeLimitExceeded(JobFailed):
    """Raised when a job ran past its soft time limit and did not handle Celery's warning."""


class DatabaseError(JobFailed):
    """Raised when a job hits a database error, standing in for it without its SQL or hosts."""


class JobCancelled(ConveyorError):
    """Raised when someone asked a running job to stop, inside that job's code."""


class LostOwnership(ConveyorError):
    """Raised when a job's attempt no longer owns its row, to roll back the attempt's writes."""
