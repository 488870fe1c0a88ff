"""Fixed-window rate-limit counters in Redis: several limits counted in one round trip.

A request is counted against an ordered list of windows (its client IP's limits, then,
when the caller is already known, its principal's). One Lua script increments them in
order and stops at the first one over its limit, so a refused IP spends nothing of the
principal's budget, and it answers each counter's count and expiry, so the
`X-RateLimit-*` headers and a 429's `Retry-After` cost no Redis read of their own. Other
commands may ride in the same round trip (`hit_along`).

Each counter is a fixed window: increment, start the expiry with the window's first hit,
refuse above the limit. Its key is Conveyor's own (`counter_key`); `limits` only parses the
limit strings of the settings (`100/second;5000/hour`) and names a limit in a 429's detail.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from limits import RateLimitItem, parse_many
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

T = TypeVar("T")

# KEYS are the counters in order; ARGV holds each one's expiry and amount in turn.
_HIT = b"""
local out = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('INCR', key)
  if current == 1 then
    redis.call('EXPIRE', key, ARGV[2 * i - 1])
  end
  out[#out + 1] = current
  out[#out + 1] = redis.call('TTL', key)
  if current > tonumber(ARGV[2 * i]) then
    break
  end
end
return out
"""

# `_HIT`, but when every counter has room for `ARGV[1]` more hits (the lease), it counts
# that many at once; else one, exactly as `_HIT`. The reply starts with the step counted.
_LEASE = b"""
local step = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') + step > tonumber(ARGV[2 * i + 1]) then
    step = 1
    break
  end
end
local out = {step}
for i, key in ipairs(KEYS) do
  local current = redis.call('INCRBY', key, step)
  if current == step then
    redis.call('EXPIRE', key, ARGV[2 * i])
  end
  out[#out + 1] = current
  out[#out + 1] = redis.call('TTL', key)
  if current > tonumber(ARGV[2 * i + 1]) then
    break
  end
end
return out
"""


def parse_limits(text: str) -> tuple[RateLimitItem, ...]:
    """Parse `100/second;5000/hour` (or "" for none), shortest window first."""
    # Stable by each window's unit (second, minute, …): the shortest is counted first.
    items = parse_many(text) if text.strip() else []
    return tuple(sorted(items, key=lambda item: item.GRANULARITY.seconds))


def counter_key(prefix: str, who: str, scope: str, item: RateLimitItem) -> str:
    """Return the Redis key that counts `who` against `item` in `scope`.

    The key is `<prefix>:<who>:<scope>:<amount>/<seconds>`, for example
    `conveyor-rl:ip:192.0.2.7:ip-read:240000/60`: `prefix` is `CONVEYOR_RATE_LIMIT_PREFIX`,
    `who` what is counted (`ip:…`, `key:…`, `user:…`, `email:…`), `scope` the endpoint
    group as counted (`ip-read`, `principal-read`) or the sign-in route, and the window the
    limit's amount per its length in seconds, so a changed limit starts a counter of its own.
    """
    return f"{prefix}:{who}:{scope}:{item.amount}/{item.get_expiry()}"


@dataclass(frozen=True)
class Counter:
    """One limit applied to one caller: the Redis key it is counted under, and the limit."""

    key: str
    item: RateLimitItem
    # Who is counted, as `ip:…`, `key:…`, `user:…` or `email:…`.
    who: str

    @classmethod
    def of(cls, item: RateLimitItem, prefix: str, who: str, scope: str) -> Counter:
        """Return the counter of `item` for `who` in `scope`, under `counter_key`."""
        return cls(counter_key(prefix, who, scope, item), item, who)


@dataclass(frozen=True)
class Window:
    """A counter as this request's hit left it."""

    counter: Counter
    remaining: int
    # Epoch seconds at which the window reopens.
    reset: float
    breached: bool

    @property
    def retry_after(self) -> int:
        """Return the whole seconds until the window reopens, at least one."""
        return max(1, math.ceil(self.reset - time.time()))


class RateWindows:
    """Counts requests against fixed windows in Redis, many counters per round trip."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        # EVALSHA, loading the script only when Redis does not have it (a restart, a flush).
        self._hit = redis.register_script(_HIT)
        self._lease = redis.register_script(_LEASE)

    def hit(self, counters: Sequence[Counter]) -> list[Window]:
        """Count one request against `counters` in order, up to and including the first breach.

        Raises redis-py's `RedisError` when Redis cannot count.
        """
        keys, args = self._script_input(counters)
        return self._windows(counters, self._hit(keys=keys, args=args))

    def lease(self, counters: Sequence[Counter], size: int) -> tuple[list[Window], int]:
        """Count `size` hits against `counters` when all have room for them, else one as `hit`.

        Returns the windows as the count left them and the hits counted (1 or `size`); the
        caller holds the rest for its next requests. Raises redis-py's `RedisError`.
        """
        keys, args = self._script_input(counters)
        step, *replies = self._lease(keys=keys, args=[size, *args])
        return self._windows(counters, replies), int(step)

    @property
    def redis(self) -> Redis:
        """Return the Redis client the counters live in."""
        return self._redis

    def hit_along(
        self, counters: Sequence[Counter], queue: Callable[[Pipeline], T]
    ) -> tuple[list[Window], T, list[Any]]:
        """Count as `hit` does, sending the commands `queue` adds in the same round trip.

        Returns the windows, what `queue` returned, and the replies to its commands, a
        failed command's error in its place. Raises redis-py's `RedisError` when Redis
        cannot count.
        """
        keys, args = self._script_input(counters)
        # EVALSHA by hand: a redis-py Script in a pipeline costs a SCRIPT EXISTS round trip.
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.evalsha(self._hit.sha, len(keys), *keys, *args)
            queued = queue(pipe)
            counted, *replies = pipe.execute(raise_on_error=False)
        if isinstance(counted, NoScriptError):
            # Redis restarted or flushed its scripts, so nothing was counted: `hit` loads
            # the script and counts; the other replies stand.
            return self.hit(counters), queued, replies
        if isinstance(counted, RedisError):
            raise counted
        return self._windows(counters, counted), queued, replies

    @staticmethod
    def _script_input(counters: Sequence[Counter]) -> tuple[list[str], list[int]]:
        args: list[int] = []
        for counter in counters:
            args += (counter.item.get_expiry(), counter.item.amount)
        return [c.key for c in counters], args

    @staticmethod
    def _windows(counters: Sequence[Counter], replies: list[Any]) -> list[Window]:
        now = time.time()
        windows = []
        for counter, count, ttl in zip(counters, replies[::2], replies[1::2], strict=False):
            amount = counter.item.amount
            # The expiry as a time, never a negative TTL (a key without one reads as -1).
            windows.append(
                Window(counter, max(0, amount - int(count)), now + max(int(ttl), 0), count > amount)
            )
        return windows
