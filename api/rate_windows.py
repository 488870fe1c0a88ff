"""Fixed-window rate limiting whose hit also answers the window's state, in one round trip.

Flask-Limiter's `X-RateLimit-*` headers, and the `Retry-After` of a 429, need the counter
and its expiry. `limits`' fixed window reads them back with a `GET` and a `TTL` after its
increment: two more Redis round trips on every request. Here the increment's own script
returns both, and the request remembers them, so the headers cost nothing extra. The
counting itself is `limits`' fixed window, unchanged: increment by the cost, start the
expiry with the window's first hit, refuse above the limit.
"""

from __future__ import annotations

import time
from typing import Any

from flask import g, has_request_context
from limits import RateLimitItem
from limits.errors import StorageError
from limits.storage import RedisStorage
from limits.strategies import STRATEGIES, FixedWindowRateLimiter
from limits.util import WindowStats

# The name Flask-Limiter is given for this strategy (`Limiter(strategy=...)`).
STRATEGY = "fixed-window-with-stats"
_SEEN = "rate_limit_windows"

# `limits`' incr_expire.lua, also returning the counter's TTL.
_HIT = b"""
local current = redis.call('INCRBY', KEYS[1], ARGV[2])
if tonumber(current) == tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return {current, redis.call('TTL', KEYS[1])}
"""


class FixedWindowWithStats(FixedWindowRateLimiter):
    """The fixed window, remembering each hit's count and expiry for the rest of the request."""

    def __init__(self, storage: Any) -> None:
        super().__init__(storage)
        self._redis = storage if isinstance(storage, RedisStorage) else None
        self._script = self._redis.get_connection().register_script(_HIT) if self._redis else None

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """Count `cost` against the limit; True while it is not exceeded."""
        if self._redis is None or self._script is None or not has_request_context():
            return super().hit(item, *identifiers, cost=cost)
        key = item.key_for(*identifiers)
        try:
            count, ttl = self._script(
                keys=[self._redis.prefixed_key(key)], args=[item.get_expiry(), cost]
            )
        except self._redis.base_exceptions as exc:
            # As `limits` reports its own storage failures (api/limits.py hears them).
            if self._redis.wrap_exceptions:
                raise StorageError(exc) from exc
            raise
        seen: dict[str, WindowStats] = g.setdefault(_SEEN, {})
        # As `limits` reads them back: the expiry as a timestamp, never a negative TTL.
        seen[key] = WindowStats(time.time() + max(int(ttl), 0), max(0, item.amount - int(count)))
        return int(count) <= item.amount

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        """Return the window as this request's hit left it, else as Redis has it now."""
        if has_request_context():
            seen: dict[str, WindowStats] = g.get(_SEEN, {})
            stats = seen.get(item.key_for(*identifiers))
            if stats is not None:
                return stats
        return super().get_window_stats(item, *identifiers)


def register() -> None:
    """Make the strategy available to Flask-Limiter by name."""
    STRATEGIES.setdefault(STRATEGY, FixedWindowWithStats)
