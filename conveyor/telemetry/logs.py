"""Logs as data for the api, worker and beat: JSON lines, or readable text in development.

Every logger, ours, Celery's, gunicorn's and Python's warnings, goes through one
structlog formatter on the root logger, so each line carries the context bound with
`bind_context` (`request_id`, `job_id`, `tenant_id`, `job_type`) wherever it was logged,
and, while tracing is on, the current span's `trace_id` and `span_id`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from pydantic import SecretBytes, SecretStr
from structlog.typing import Processor

from conveyor.settings import Settings
from conveyor.telemetry.tracing import add_trace_ids

# Keys whose values never reach a log line, whoever logs them (payloads hold business data).
SENSITIVE_KEYS = frozenset(
    {
        "access_token",
        "api_key",
        "authorization",
        "password",
        "payload",
        "refresh_token",
        "secret",
        "secret_key",
        "token",
    }
)
REDACTED = "[redacted]"


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace sensitive keys' values and any SecretStr, so a careless `extra=` leaks nothing."""
    for key, value in event_dict.items():
        if key in SENSITIVE_KEYS or isinstance(value, SecretStr | SecretBytes):
            event_dict[key] = REDACTED
    return event_dict


def tidy_foreign(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop the copy of the message `logging` adds; name the job Celery's own lines are about."""
    if event_dict.get("message") == event_dict.get("event"):
        event_dict.pop("message", None)
    data = event_dict.get("data")
    # Celery's worker lines ("Task ... received") pass the task as `extra={"data": ...}`.
    if isinstance(data, dict) and "id" in data and "name" in data:
        event_dict.setdefault("job_id", str(data["id"]))
        event_dict.setdefault("job_type", str(data["name"]))
    return event_dict


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time, like logging's own last resort.

    Test runners swap `sys.stderr` per test; a handler that kept the first one would
    write to a closed file.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        """Return the current standard error."""
        return sys.stderr


def use_json(settings: Settings) -> bool:
    """Return whether to render JSON: by the setting, else everywhere but development."""
    if settings.log_format == "auto":
        return settings.env != "development"
    return settings.log_format == "json"


def configure_logging(settings: Settings) -> None:
    """Route every logger through structlog to stderr at the configured level; idempotent."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        # trace_id and span_id while tracing is on (conveyor.telemetry.tracing).
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer: list[Processor]
    # Tracebacks as plain text, never with local variables: a frame's locals hold settings,
    # keys and signed headers. (The console renderer's default, rich when installed, shows
    # them.)
    if use_json(settings):
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            )
        ]
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # Records from plain `logging` loggers: their `extra=` fields become keys.
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), tidy_foreign, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    handler.conveyor = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    # Replace our previous handler (a second app in one process), keep anyone else's.
    for old in [h for h in root.handlers if getattr(h, "conveyor", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)


def bind_context(**values: Any) -> None:
    """Attach values (request_id, job_id, tenant_id, job_type) to every later line here."""
    structlog.contextvars.bind_contextvars(
        **{k: str(v) for k, v in values.items() if v is not None}
    )


def clear_context() -> None:
    """Forget the values bound for the previous request or job."""
    structlog.contextvars.clear_contextvars()
