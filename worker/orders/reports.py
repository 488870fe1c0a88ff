"""The daily-revenue report: read from the rollup, cached in Redis per tenant and range."""

from __future__ import annotations

import json
import uuid
from datetime import date
from typing import Any

from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.orders.models import DailyRevenue

CACHE_SECONDS = 3600


def _version_key(tenant_id: uuid.UUID) -> str:
    return f"conveyor:report-version:{tenant_id}"


def invalidate(redis: Redis, tenant_id: uuid.UUID) -> None:
    """Make every cached report of the tenant stale at once (a new version, no key scan)."""
    redis.incr(_version_key(tenant_id))


def daily_revenue(
    session: Session,
    redis: Redis,
    tenant_id: uuid.UUID,
    start: date,
    end: date,
    currency: str | None,
) -> tuple[list[dict[str, Any]], bool]:
    """Return the rollup rows for a range, and whether they came from the cache."""
    version = int(redis.get(_version_key(tenant_id)) or 0)
    key = f"conveyor:report:{tenant_id}:{version}:{start}:{end}:{currency or '*'}"
    cached = redis.get(key)
    if cached is not None:
        items: list[dict[str, Any]] = json.loads(cached)
        return items, True
    query = select(DailyRevenue).where(
        DailyRevenue.tenant_id == tenant_id, DailyRevenue.day.between(start, end)
    )
    if currency is not None:
        query = query.where(DailyRevenue.currency == currency)
    rows = session.scalars(query.order_by(DailyRevenue.day, DailyRevenue.currency))
    items = [
        {
            "day": r.day.isoformat(),
            "currency": r.currency,
            "orders": r.orders,
            "total": str(r.total),
        }
        for r in rows
    ]
    redis.set(key, json.dumps(items), ex=CACHE_SECONDS)
    return items, False
