"""Live progress of running jobs, kept in the Celery result backend (Redis)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from redis import Redis

PROGRESS_STATE = "PROGRESS"
# Celery's Redis backend stores a task's state under this key prefix.
RESULT_KEY_PREFIX = "celery-task-meta-"


def progress_meta(current: int, total: int | None, message: str | None) -> dict[str, Any]:
    """Build the progress document a worker stores and the API returns."""
    percent = round(100 * current / total, 1) if total else None
    return {"current": current, "total": total, "percent": percent, "message": message}


def read_progress(redis: Redis, job_id: uuid.UUID) -> dict[str, Any] | None:
    """Return a job's latest progress from the result backend, or `None` if it has none."""
    raw = redis.get(f"{RESULT_KEY_PREFIX}{job_id}")
    return None if raw is None else parse_progress(raw)


def parse_progress(raw: bytes | str) -> dict[str, Any] | None:
    """Return the progress in a result-backend document, or `None` if it holds none."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("status") != PROGRESS_STATE:
        return None
    result = meta.get("result")
    return result if isinstance(result, dict) else None
