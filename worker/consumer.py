"""Keep a thread-pool worker's broker connection in the event loop's hands after a reconnect.

When a worker reconnects with jobs still running, Celery cuts the prefetch count and
restores it step by step as jobs received after the reconnect are acknowledged. It runs
each step as a callback of the acknowledgement, in the thread that acknowledges: with the
thread pool (`-P threads`, and the tests' in-process workers) that is a pool thread, which
then sends basic.qos on the consumer connection and reads it for the qos-ok while the event
loop reads the same socket. A py-amqp connection is not thread-safe (celery/py-amqp#90): the
two readers split frames between them, and one waits for ever for the rest of a frame the
other took, so the worker hangs and never stops. Still so in Celery/kombu 5.7. A prefork
worker acknowledges in its event loop and is not affected; this consumer hands the step to
the event loop whatever the pool, as Celery already does for the acknowledgement itself.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery
from celery.worker.consumer import Consumer

from conveyor.broker.internals import PrefetchRestoreHook


class LoopBoundConsumer(PrefetchRestoreHook, Consumer):
    """A Celery consumer that changes its prefetch count only from its event loop."""

    def schedule_prefetch_restore(self, restore: Callable[[], None]) -> None:
        """Run the step in the event loop's thread, or at once where one thread reads."""
        if self.hub is None:  # no event loop (solo, gevent, eventlet): one thread reads
            restore()
            return
        # Thread-safe: it wakes the loop if called from another thread.
        self.hub.call_soon(restore)


def install(app: Celery) -> None:
    """Make `app`'s workers use the loop-bound consumer."""
    app.conf.worker_consumer = f"{__name__}:{LoopBoundConsumer.__name__}"
