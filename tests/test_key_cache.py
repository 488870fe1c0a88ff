"""The per-process API-key cache: fresh for `ttl` seconds, never past a key's expiry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.auth.keys import Principal, PrincipalCache
from conveyor.auth.roles import Role
from conveyor.settings import Settings
from tests.conftest import bearer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def principal(expires_at: datetime | None = None) -> Principal:
    return Principal(tenant_id=uuid.uuid4(), role=Role.MEMBER, expires_at=expires_at)


def test_a_cached_key_is_forgotten_after_its_ttl() -> None:
    clock = FakeClock()
    cache = PrincipalCache(5, clock=clock)
    now = datetime.now(UTC)
    who = principal()
    cache.put("cvk_a", who)
    assert cache.get("cvk_a", now) == who
    assert cache.get("cvk_b", now) is None
    clock.now += 5
    assert cache.get("cvk_a", now) is None


def test_a_cached_key_never_outlives_its_expiry() -> None:
    cache = PrincipalCache(60, clock=FakeClock())
    now = datetime.now(UTC)
    cache.put("cvk_a", principal(expires_at=now + timedelta(seconds=1)))
    assert cache.get("cvk_a", now) is not None
    assert cache.get("cvk_a", now + timedelta(seconds=1)) is None


def test_clear_and_zero_ttl_and_bounded_size() -> None:
    now = datetime.now(UTC)
    cache = PrincipalCache(5, max_entries=2, clock=FakeClock())
    for token in ("cvk_a", "cvk_b", "cvk_c"):
        cache.put(token, principal())
    assert cache.get("cvk_c", now) is not None
    assert cache.get("cvk_a", now) is None  # the overflow started the cache over
    cache.clear()
    assert cache.get("cvk_c", now) is None
    off = PrincipalCache(0)
    off.put("cvk_a", principal())
    assert off.get("cvk_a", now) is None


def test_another_api_process_stops_a_revoked_key_within_the_ttl(
    settings: Settings, identity: Any
) -> None:
    """Revocation in one API process reaches a second one once its cache entry goes stale."""
    from api import create_app

    clock = FakeClock()
    here, there = create_app(settings), create_app(settings)
    there.extensions["conveyor"].key_cache = PrincipalCache(5, clock=clock)
    token = identity.token
    try:
        assert there.test_client().get("/v1/jobs", headers=bearer(token)).status_code == 200
        key_id = identity.api_key.id
        revoked = here.test_client().delete(f"/v1/api-keys/{key_id}", headers=bearer(token))
        assert revoked.status_code == 204
        assert here.test_client().get("/v1/jobs", headers=bearer(token)).status_code == 401
        # Within the TTL the other process still trusts its cached entry, as documented...
        assert there.test_client().get("/v1/jobs", headers=bearer(token)).status_code == 200
        clock.now += 5
        # ...and after it, the key is refused there too.
        assert there.test_client().get("/v1/jobs", headers=bearer(token)).status_code == 401
    finally:
        for app in (here, there):
            app.extensions["conveyor"].engine.dispose()
