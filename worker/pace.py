"""How many messages the dispatcher lets the broker hold per queue: a short while of work.

A message in the broker is a promise made before its turn: every other tenant's next job
waits behind it. So the dispatcher keeps about `HORIZON` seconds of the workers' recent
pace in each busy queue, enough that they never wait for a pass (passes come every
`BUSY_TICK`, 50 ms), and no more. The pace is learnt from the queue itself: what the
broker held after one pass, less what it holds at the next, over the time between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

HORIZON = 0.25
# Never less than this many in flight, whatever the pace (a queue just woken has none yet).
FLOOR = 10
# A pace older than this says nothing of the workers now (the queue was idle meanwhile).
STALE = 2.0
SMOOTHING = 0.3


@dataclass
class Pace:
    """One queue's pace: messages the workers take per second, smoothed over passes."""

    rate: float | None = None
    _after: tuple[float, int] | None = field(default=None, repr=False)

    def room(self, now: float, depth: int, ceiling: int) -> int:
        """Learn from the depth now; return how many more messages the queue should get.

        Without a recent pace (the first pass, or after a pause in the queue's traffic)
        the ceiling holds, as a fixed in-flight bound would.
        """
        if self._after is not None:
            then, held = self._after
            if now - then > STALE:
                self.rate = None
            elif now > then:
                taken = max(0, held - depth) / (now - then)
                self.rate = (
                    taken
                    if self.rate is None
                    else (SMOOTHING * taken + (1 - SMOOTHING) * self.rate)
                )
        if self.rate is None:
            target = ceiling
        else:
            target = min(ceiling, max(FLOOR, math.ceil(self.rate * HORIZON)))
        return target - depth

    def published(self, now: float, depth: int, count: int) -> None:
        """Remember what the queue holds after a pass published `count` into `depth`."""
        self._after = (now, depth + count)
