"""The benchmark's arithmetic: spreads, paired per-round ratios, a constant-rate schedule.

Pure functions, unit-tested in tests/test_bench_stats.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def percentile(values: Sequence[float], pct: float) -> float:
    """Return the `pct` percentile of `values`, linearly interpolated (numpy's default)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = pct / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Spread:
    """The median of some per-round figures, with their range and interquartile range."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        """Return the spread as plain JSON-ready fields."""
        return asdict(self)

    def text(self, digits: int = 2) -> str:
        """Render as `median (min-max)`, e.g. `0.71 (0.62-0.80)`."""
        if self.n == 1:
            return f"{self.median:,.{digits}f}"
        return f"{self.median:,.{digits}f} ({self.low:,.{digits}f}-{self.high:,.{digits}f})"


def spread(values: Sequence[float]) -> Spread:
    """Summarise per-round figures: median, min, max, first and third quartile."""
    if not values:
        raise ValueError("no values")
    return Spread(
        median=statistics.median(values),
        low=min(values),
        high=max(values),
        q1=percentile(values, 25),
        q3=percentile(values, 75),
        n=len(values),
    )


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Return round-by-round ratios: the i-th numerator over the i-th denominator.

    Pairing keeps each ratio to two measures taken side by side, so a machine that gets
    busier between rounds moves both halves of a ratio, not the ratio. Rounds missing on
    either side, or with a zero denominator, are dropped.
    """
    return [n / d for n, d in zip(numerators, denominators, strict=False) if d]


def paired_spread(numerators: Sequence[float], denominators: Sequence[float]) -> Spread | None:
    """Return the spread of the paired per-round ratios, or None when no round pairs up."""
    ratios = paired_ratios(numerators, denominators)
    return spread(ratios) if ratios else None


def send_times(rate: float, seconds: float, start: float = 0.0) -> Iterator[float]:
    """Yield the intended send times of an open-loop load: one every 1/rate s for `seconds`.

    The times are fixed in advance, whatever the server does: a generator that waited for
    answers before sending would slow down with the server and hide its queueing delay.
    """
    if rate <= 0 or seconds <= 0:
        return
    count = int(rate * seconds)
    for i in range(count):
        yield start + i / rate


def interleaved(names: Sequence[T], round_index: int) -> list[T]:
    """Return the order the stacks run in `round_index`: as given in even rounds, reversed in odd.

    No stack always goes first (into a cold cache, or after the other's leftovers).
    """
    return list(names) if round_index % 2 == 0 else list(reversed(names))
