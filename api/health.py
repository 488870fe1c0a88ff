"""Liveness and readiness probes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Literal

from flask import Response, jsonify
from flask_openapi3.blueprint import APIBlueprint
from kombu import Connection
from pydantic import BaseModel
from sqlalchemy import text

from api.openapi import described, responses, tag
from api.services import Services, services

logger = logging.getLogger(__name__)
bp = APIBlueprint("health", __name__, abp_tags=tag("health"))
# Seconds each dependency gets to answer; a probe that hangs is as bad as one that fails.
CHECK_TIMEOUT = 2.0


class Health(BaseModel):
    """`GET /healthz`."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """`GET /readyz`: each dependency's state."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, Literal["ok", "timeout", "unavailable"]]


@bp.get("/healthz", responses=responses({200: Health}))
def healthz() -> Response:
    """Answer 200 while the process is up; checks no dependency."""
    return jsonify(status="ok")


def check_database(svc: Services) -> None:
    """Run `SELECT 1` on a pooled connection, bounded by a statement timeout."""
    with svc.engine.connect() as conn:
        conn.execute(text(f"SET LOCAL statement_timeout = {int(CHECK_TIMEOUT * 1000)}"))
        conn.execute(text("SELECT 1"))


def check_broker(svc: Services) -> None:
    """Open a fresh broker connection (Redis or RabbitMQ alike) with no retry."""
    options = {"socket_timeout": CHECK_TIMEOUT, "socket_connect_timeout": CHECK_TIMEOUT}
    with Connection(
        svc.settings.broker, connect_timeout=CHECK_TIMEOUT, transport_options=options
    ) as conn:
        conn.ensure_connection(max_retries=0, timeout=CHECK_TIMEOUT)


def check_result_backend(svc: Services) -> None:
    """Ping the result backend, where the API reads live progress."""
    svc.redis.ping()


CHECKS: dict[str, Callable[[Services], None]] = {
    "database": check_database,
    "broker": check_broker,
    "result_backend": check_result_backend,
}


@bp.get(
    "/readyz",
    responses=responses(
        {200: Readiness, 503: described(Readiness, "A dependency is down; `checks` says which.")}
    ),
)
def readyz() -> tuple[Response, int]:
    """Check PostgreSQL, the broker and the result backend at once; 503 names which failed."""
    svc = services()
    checks: dict[str, str] = {}
    # In parallel, so a probe costs the slowest check rather than their sum; a hung one
    # is reported after CHECK_TIMEOUT while its thread runs out its own socket timeout.
    pool = ThreadPoolExecutor(max_workers=len(CHECKS), thread_name_prefix="readyz")
    futures = {name: pool.submit(check, svc) for name, check in CHECKS.items()}
    for name, future in futures.items():
        try:
            future.result(timeout=CHECK_TIMEOUT + 0.5)
            checks[name] = "ok"
        except FutureTimeout:
            logger.warning("readiness: %s timed out", name)
            checks[name] = "timeout"
        except Exception:  # any failure means not ready; the log has the reason
            logger.warning("readiness: %s unavailable", name, exc_info=True)
            checks[name] = "unavailable"
    pool.shutdown(wait=False)
    ready = all(v == "ok" for v in checks.values())
    return jsonify(status="ok" if ready else "unavailable", checks=checks), 200 if ready else 503
