"""Leased rate-limit hits (api/rate_leases.py): fewer round trips, and the limit still holds.

The tolerance under test: across P processes leasing `size` hits, a window never admits
more than its limit, and admits at least limit - P·(size - 1).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from flask import Flask
from redis import Redis

from api.rate_leases import MIN_MULTIPLE, Leases
from api.rate_windows import Counter, RateWindows, parse_limits
from bench.roundtrips import watch_redis
from conveyor.auth.bootstrap import Identity
from tests.conftest import bearer

SIZE = 16


def counters(amount: int, per: str = "minute") -> list[Counter]:
    """Return one fresh counter of `amount` hits per `per` and one of ten times that."""
    prefix, who = f"rl-{uuid.uuid4().hex}", "key:test"
    limits = parse_limits(f"{amount}/{per};{amount * 10}/hour")
    return [Counter.of(item, prefix, who, "principal-submit") for item in limits]


@pytest.mark.parametrize("processes", [1, 2, 5])
def test_processes_leasing_one_limit_never_admit_past_it(
    redis_client: Redis, processes: int
) -> None:
    limit = MIN_MULTIPLE * SIZE
    shared = counters(limit)
    # One Leases per process, each with a client of its own, taking turns request by request.
    each = [Leases(RateWindows(Redis(connection_pool=redis_client.connection_pool)), SIZE)]
    each += [
        Leases(RateWindows(Redis(connection_pool=redis_client.connection_pool)), SIZE)
        for _ in range(processes - 1)
    ]
    admitted = refused = 0
    for n in range(limit + processes * SIZE * 2):
        windows = each[n % processes].hit(shared)
        if windows[-1].breached:
            refused += 1
        else:
            admitted += 1
    assert limit - processes * (SIZE - 1) <= admitted <= limit
    assert refused > 0
    # Redis counted every leased hit, used or not: never below what was admitted.
    assert int(redis_client.get(shared[0].key) or 0) >= admitted


def test_a_small_limit_is_counted_hit_by_hit(redis_client: Redis) -> None:
    small = counters(MIN_MULTIPLE * SIZE - 1)
    leases = Leases(RateWindows(redis_client), SIZE)
    assert not leases.leasable(small)
    assert leases.leasable(counters(MIN_MULTIPLE * SIZE))
    assert not Leases(RateWindows(redis_client), 1).leasable(counters(10**6))


def test_a_lease_is_not_used_past_its_shortest_window(redis_client: Redis) -> None:
    now = [1000.0]
    leases = Leases(RateWindows(redis_client), SIZE, clock=lambda: now[0])
    shared = counters(MIN_MULTIPLE * SIZE)
    leases.hit(shared)
    assert int(redis_client.get(shared[0].key) or 0) == SIZE
    for _ in range(SIZE - 1):
        leases.hit(shared)
    assert int(redis_client.get(shared[0].key) or 0) == SIZE  # all from the lease
    leases.hit(shared)
    assert int(redis_client.get(shared[0].key) or 0) == 2 * SIZE
    # The window (a minute) is ending: the lease ends a second before Redis's counter does.
    now[0] += 59.5
    leases.hit(shared)
    assert int(redis_client.get(shared[0].key) or 0) == 3 * SIZE


def test_the_remaining_header_counts_unused_leased_hits_as_left(redis_client: Redis) -> None:
    leases = Leases(RateWindows(redis_client), SIZE)
    shared = counters(MIN_MULTIPLE * SIZE)
    remaining = [leases.hit(shared)[0].remaining for _ in range(SIZE)]
    assert remaining == [MIN_MULTIPLE * SIZE - n for n in range(1, SIZE + 1)]


def test_most_submits_make_no_limiter_round_trip(
    make_app: Callable[..., Flask], identity: Identity
) -> None:
    app = make_app()
    client = app.test_client()
    auth = bearer(identity.token)
    assert client.get("/v1/jobs?limit=1", headers=auth).status_code == 200  # caches the key
    with watch_redis() as sent:
        statuses = [client.get("/v1/jobs?limit=1", headers=auth).status_code for _ in range(SIZE)]
    assert statuses == [200] * SIZE
    # One lease of SIZE hits for the IP and the key together; the rest come from it.
    assert sent["round trips"] == 1
    assert sent.get("EVALSHA", 0) == 1
