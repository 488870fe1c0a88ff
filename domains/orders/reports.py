"""The daily-revenue report: read from the rollup, cached in Redis per tenant and range.

A tenant's cached reports share one Redis hash per rollup version (a field per range and
currency) that holds at most `MAX_CACHED_RANGES` of them and expires `CACHE_SECONDS` after
its first: however many ranges a client asks for, the cache stays bounded. A range past
the cap is still answered from the rollup, just not cached.
"""

from __future__ import annotations

import json
import uuid
from datetime import date
from typing import Any

from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from domains.orders.models import DailyRevenue

CACHE_SECONDS = 3600
MAX_CACHED_RANGES = 64
# Store one report unless the hash already holds the cap of others; start the hash's expiry
# with its first field. One script, so concurrent misses cannot together pass the cap.
_STORE_CAPPED = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return 1
"""


def _version_key(tenant_id: uuid.UUID) -> str:
    return f"conveyor:report-version:{tenant_id}"


def _cache_key(tenant_id: uuid.UUID, version: int) -> str:
    return f"conveyor:report:{tenant_id}:{version}"


def invalidate(redis: Redis, tenant_id: uuid.UUID) -> None:
    """Make every cached report of the tenant stale at once (a new version, no key scan)."""
    version = int(redis.incr(_version_key(tenant_id)))
    # The previous version's reports are stale for good: free them now, not at their expiry.
    redis.delete(_cache_key(tenant_id, version - 1))


def _store_capped(redis: Redis, key: str, field: str, value: str) -> bool:
    """Cache one report in the tenant's hash unless it is full; return whether it was."""
    store = redis.register_script(_STORE_CAPPED)
    return bool(store(keys=[key], args=[field, value, MAX_CACHED_RANGES, CACHE_SECONDS]))


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
    key, field = _cache_key(tenant_id, version), f"{start}:{end}:{currency or '*'}"
    cached = redis.hget(key, field)
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
    _store_capped(redis, key, field, json.dumps(items))
    return items, False
