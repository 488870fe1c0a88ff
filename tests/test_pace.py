"""The dispatcher's pace: how many messages a busy queue gets (pure arithmetic, no servers)."""

from __future__ import annotations

from worker.pace import FLOOR, HORIZON, STALE, Pace


def test_without_a_pace_the_ceiling_holds() -> None:
    assert Pace().room(0.0, depth=30, ceiling=100) == 70


def test_the_room_follows_the_workers_pace() -> None:
    pace = Pace()
    pace.room(0.0, depth=0, ceiling=1000)
    pace.published(0.0, depth=0, count=100)
    # 50 taken in 0.1 s: 500 a second, so the broker should hold a quarter second of it.
    room = pace.room(0.1, depth=50, ceiling=1000)
    assert pace.rate == 500
    assert room == round(500 * HORIZON) - 50


def test_slow_workers_get_the_floor_and_a_stale_pace_is_forgotten() -> None:
    pace = Pace()
    pace.room(0.0, depth=0, ceiling=100)
    pace.published(0.0, depth=0, count=20)
    assert pace.room(1.0, depth=19, ceiling=100) == FLOOR - 19  # one a second
    pace.published(1.0, depth=19, count=0)
    assert pace.room(1.0 + STALE + 1, depth=0, ceiling=100) == 100
    assert pace.rate is None


def test_the_pace_is_smoothed_over_passes() -> None:
    pace = Pace(rate=100.0)
    pace.published(0.0, depth=0, count=50)
    pace.room(0.1, depth=0, ceiling=1000)  # 500 a second this time
    assert 100 < (pace.rate or 0) < 500
