"""Rate-limit hits leased in chunks per process, so most requests make no limiter round trip.

A process counting a request against windows with plenty of room counts `size` hits in
Redis at once (`RateWindows.lease`) and admits its next `size - 1` requests for the same
counters from that lease, with no Redis round trip, until the shortest window ends.

Why the limit still holds across processes: every hit a lease admits was counted in Redis
before it was admitted, and a lease is granted only while every counter has room for all
of it, so the requests admitted in one window never exceed its limit, however many
processes lease. The error goes the other way: hits leased but not used yet count against
the caller, so with P processes a caller may be refused after limit - P·(size - 1)
requests in a window instead of at the limit. Leases are taken only for limits of at least
`MIN_MULTIPLE`·size hits, so that early refusal stays under P/`MIN_MULTIPLE` of the limit
(1% per process). A lease ends a second before its shortest window (Redis rounds a TTL to
the second), so its hits are never used in the next window; unused ones lapse with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from api.rate_windows import Counter, RateWindows, Window

# A limit is leased only if it allows this many leases' worth of hits per window.
MIN_MULTIPLE = 100
# Leases held per process at most (one per caller and endpoint group); beyond, the
# expired ones go, and if none has, all of them (a lease dropped is only hits unused).
MAX_LEASES = 10_000


@dataclass
class _Lease:
    """Hits counted in Redis and not used yet, and the windows as that count left them."""

    left: int
    until: float  # on the monotonic clock
    windows: list[Window]


class Leases:
    """Counts requests from per-process leases of `size` hits, taking a new one when spent."""

    def __init__(
        self, windows: RateWindows, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._windows = windows
        self._size = size
        self._clock = clock
        self._leases: dict[tuple[str, ...], _Lease] = {}
        self._lock = threading.Lock()

    def leasable(self, counters: Sequence[Counter]) -> bool:
        """Return whether these counters' limits are large enough to lease hits of."""
        return self._size > 1 and all(c.item.amount >= MIN_MULTIPLE * self._size for c in counters)

    def hit(self, counters: Sequence[Counter]) -> list[Window]:
        """Count one request: from this process's open lease, else in Redis (maybe leasing).

        Raises redis-py's `RedisError` when Redis cannot count.
        """
        key = tuple(c.key for c in counters)
        now = self._clock()
        with self._lock:
            lease = self._leases.get(key)
            if lease is not None and lease.left > 0 and now < lease.until:
                lease.left -= 1
                # The headers count the hits leased and unused as still there.
                return [replace(w, remaining=w.remaining + lease.left) for w in lease.windows]
            self._leases.pop(key, None)
        windows, counted = self._windows.lease(counters, self._size)
        if counted == 1:
            return windows
        seconds = min(w.reset for w in windows) - time.time() - 1
        if seconds > 0:
            self._keep(key, _Lease(counted - 1, now + seconds, windows))
        return [replace(w, remaining=w.remaining + counted - 1) for w in windows]

    def _keep(self, key: tuple[str, ...], lease: _Lease) -> None:
        with self._lock:
            if len(self._leases) >= MAX_LEASES:
                now = self._clock()
                self._leases = {k: v for k, v in self._leases.items() if v.until > now}
                if len(self._leases) >= MAX_LEASES:
                    self._leases.clear()
            self._leases[key] = lease
