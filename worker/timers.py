"""Keep the prefork worker's event-loop timer from hoarding the time limits of finished jobs.

The main process of a prefork worker arms a timer entry for every job with a time limit
(all of Conveyor's: `default_time_limit` when a type sets none). When the job finishes
the entry is only flagged cancelled; kombu's timer keeps it in its heap until its time
comes, `time_limit` seconds later (celery/celery#1129, #5200: still so in Celery/kombu
5.7). About 0.5 kB a job: at 30 jobs/s and the default 30 minutes that is 27 MB held
for nothing, at 1,000 jobs/s close to a gigabyte, and it looks like a leak for the
first half hour. This bootstep drops the cancelled entries every few seconds instead
(`conveyor.broker.internals.purge_cancelled`: kombu's heap is private).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps

from conveyor.broker.internals import purge_cancelled

# Seconds between two sweeps: between them at most `rate * interval` entries wait.
PURGE_INTERVAL = 10.0


class PurgeCancelledTimers(bootsteps.Step):
    """Sweep the worker's event-loop timer for cancelled entries on a fixed interval."""

    requires = ("celery.worker.components:Hub",)

    def include_if(self, w: Any) -> bool:
        """Only event-loop workers (prefork on Redis or AMQP) arm a timer entry per job."""
        return bool(getattr(w, "use_eventloop", False))

    def create(self, w: Any) -> None:
        """Schedule the sweep on the hub's own timer: it runs in the event loop's thread."""
        w.hub.call_repeatedly(PURGE_INTERVAL, purge_cancelled, w.hub.timer)


def install(app: Celery) -> None:
    """Add the sweep to `app`'s worker blueprint."""
    app.steps["worker"].add(PurgeCancelledTimers)
