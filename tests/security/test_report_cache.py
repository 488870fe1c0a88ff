"""The revenue report's cache stays bounded however many date ranges a client asks for."""

from __future__ import annotations

import uuid
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from domains.orders import reports
from domains.orders.models import DailyRevenue

DAY = date(2026, 3, 1)


def cache_entries(redis_client: Redis, tenant_id: uuid.UUID) -> tuple[int, int]:
    """Return (Redis keys, cached reports) of the tenant: a string is one, a hash its fields."""
    keys = list(redis_client.scan_iter(f"conveyor:report:{tenant_id}:*"))
    reports_cached = sum(
        redis_client.hlen(key) if redis_client.type(key) == b"hash" else 1 for key in keys
    )
    return len(keys), reports_cached


def report(client: Any, auth: dict[str, str], days: int) -> Any:
    end = DAY + timedelta(days=days)
    response = client.get(f"/v1/reports/daily-revenue?from={DAY}&to={end}", headers=auth)
    assert response.status_code == 200
    return response


def test_many_date_ranges_cache_at_most_the_cap(
    client: Any,
    auth: dict[str, str],
    identity: Identity,
    sessions: sessionmaker[Session],
    redis_client: Redis,
) -> None:
    tenant = identity.tenant.id
    with sessions.begin() as session:
        session.add(
            DailyRevenue(tenant_id=tenant, day=DAY, currency="EUR", orders=2, total=Decimal("3.50"))
        )
    asked = reports.MAX_CACHED_RANGES + 20
    for days in range(asked):
        assert report(client, auth, days).headers["X-Cache"] == "miss"
    assert cache_entries(redis_client, tenant) == (1, reports.MAX_CACHED_RANGES)
    (key,) = redis_client.scan_iter(f"conveyor:report:{tenant}:*")
    assert 0 < redis_client.ttl(key) <= reports.CACHE_SECONDS

    # Cached ranges are hits; a range past the cap is still answered, from the rollup.
    first, last = report(client, auth, 0), report(client, auth, asked - 1)
    assert first.headers["X-Cache"] == "hit"
    assert last.headers["X-Cache"] == "miss"
    expected = [{"day": "2026-03-01", "currency": "EUR", "orders": 2, "total": "3.50"}]
    assert first.get_json()["items"] == last.get_json()["items"] == expected
    assert cache_entries(redis_client, tenant) == (1, reports.MAX_CACHED_RANGES)

    # A rollup's invalidation frees the old version's reports at once; caching starts over.
    reports.invalidate(redis_client, tenant)
    assert cache_entries(redis_client, tenant) == (0, 0)
    assert report(client, auth, asked - 1).headers["X-Cache"] == "miss"
    assert report(client, auth, asked - 1).headers["X-Cache"] == "hit"
    assert cache_entries(redis_client, tenant) == (1, 1)
