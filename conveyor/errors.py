"""One exception tree; `api.errors` maps it to problem+json in one place."""

from __future__ import annotations

from typing import Any


class ConveyorError(Exception):
    """Raised for every failure Conveyor itself reports; the base of the tree."""

    status = 500
    title = "Internal error"
    slug = "internal"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class ValidationFailed(ConveyorError):
    """Raised when a request or payload does not match its model."""

    status = 422
    title = "Validation failed"
    slug = "validation"


class UnknownJobType(ValidationFailed):
    """Raised when a job names a type that is not registered."""

    title = "Unknown job type"
    slug = "unknown-job-type"


class NotFound(ConveyorError):
    """Raised when an object does not exist or belongs to another tenant."""

    status = 404
    title = "Not found"
    slug = "not-found"


class Unauthorized(ConveyorError):
    """Raised when a request carries no valid credentials."""

    status = 401
    title = "Unauthorized"
    slug = "unauthorized"


class ServiceUnavailable(ConveyorError):
    """Raised when a dependency (database, broker) cannot be reached."""

    status = 503
    title = "Service unavailable"
    slug = "unavailable"


class PublishFailed(ConveyorError):
    """Raised when the broker did not take (or may not have taken) a batch of messages."""

    status = 503
    title = "Broker unavailable"
    slug = "broker-unavailable"


class JobFailed(ConveyorError):
    """Raised by a job to fail its attempt with a clear message (retried if attempts remain)."""

    title = "Job failed"
    slug = "job-failed"


class PermanentError(JobFailed):
    """Raised by a job whose failure no retry can fix: it fails at once."""


class JobCancelled(ConveyorError):
    """Raised inside a running job when someone asked it to stop."""

    status = 409
    title = "Job cancelled"
    slug = "job-cancelled"


class MalformedRequest(ConveyorError):
    """Raised when a request body is not valid JSON."""

    status = 400
    title = "Malformed request"
    slug = "malformed-request"


class StorageQuotaExceeded(ConveyorError):
    """Raised when an upload would take the tenant's stored files past its storage quota."""

    status = 413
    title = "Storage quota exceeded"
    slug = "storage-quota-exceeded"


class UnsupportedMediaType(ConveyorError):
    """Raised when a JSON endpoint receives another content type."""

    status = 415
    title = "Unsupported media type"
    slug = "unsupported-media-type"


class Forbidden(ConveyorError):
    """Raised when the caller's role does not allow the action (within its own tenant)."""

    status = 403
    title = "Forbidden"
    slug = "forbidden"


class Conflict(ConveyorError):
    """Raised when a request conflicts with the current state (a taken email, a job's state)."""

    status = 409
    title = "Conflict"
    slug = "conflict"


class RateLimited(ConveyorError):
    """Raised when a caller sent more requests than its rate limit allows; retry later."""

    status = 429
    title = "Too many requests"
    slug = "rate-limited"

    def __init__(
        self,
        detail: str,
        *,
        retry_after: int,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail, errors=errors)
        # Whole seconds until a retry can succeed; sent as the `Retry-After` header.
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """Raised when a tenant's unfinished jobs would exceed its quota; retry when they drain."""

    title = "Quota exceeded"
    slug = "quota-exceeded"
