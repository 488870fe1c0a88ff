"""Admission: the jobs a request adds are held to its tenant's quota of unfinished jobs.

Every view that adds jobs (`POST /v1/jobs`, `POST /v1/jobs/batch`,
`POST /v1/schedules/{id}/trigger`) hands `admitting(...)` to the ledger's submit, which
calls it with the number of jobs once every one of them is valid and before anything is
written. So a request is refused for its rate, its caller, its syntax and its fields first;
a repeated `Idempotency-Key` adds no job and is never refused by the quota; and a refusal
(`QuotaExceeded`: 429 with a `Retry-After` from the tenant's drain rate) rolls the unit of
work back, writing and publishing nothing. The quota is counted per process by
`conveyor.quota.TenantQuota`, in the unit's own transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from flask import Flask, current_app

from conveyor.ledger.work import UnitOfWork
from conveyor.quota import TenantQuota
from conveyor.settings import Settings

EXTENSION = "conveyor.admission"


def init_app(app: Flask, settings: Settings) -> None:
    """Give the app its tenant quota: one tally per process, shared by its requests."""
    app.extensions[EXTENSION] = TenantQuota(
        settings.tenant_max_unfinished_jobs,
        refresh=settings.tenant_quota_refresh_seconds,
        drain_window=settings.tenant_drain_window_seconds,
    )


def admitting(unit: UnitOfWork, tenant_id: uuid.UUID) -> Callable[[int], None]:
    """Return the check `submit_jobs` runs on its valid jobs: within the tenant's quota, or 429."""
    quota: TenantQuota = current_app.extensions[EXTENSION]

    def admit(jobs: int) -> None:
        quota.admit(unit.session, tenant_id, jobs, datetime.now(UTC))

    return admit
