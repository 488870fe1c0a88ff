"""Conveyor's Prometheus metrics: job counters and histograms, queue gauges, an exporter.

Counters and histograms are module-level, as prometheus_client intends: each process that
imports this counts in memory, or in `PROMETHEUS_MULTIPROC_DIR` when `metrics_dir` set it
up before the import (gunicorn, Celery prefork). They are bumped where the event happens,
one increment on the hot paths; queue gauges are computed only when scraped.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from conveyor.ledger.flow import FlowStats
from conveyor.queues import QueueStats, WorkerInfo
from conveyor.telemetry.metrics_dir import multiprocess_dir

logger = logging.getLogger(__name__)

# Seconds; jobs run from milliseconds (no-ops) to the hour (the visibility timeout's scale).
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

JOBS_SUBMITTED = Counter("conveyor_jobs_submitted", "Jobs accepted by the API.", ["type", "queue"])
JOBS_FINISHED = Counter(
    "conveyor_jobs_finished",
    "Job attempts that ended, by job type and the state they left the job in "
    "(succeeded, failed, or retrying when attempts remain).",
    ["type", "state"],
)
JOBS_REDRIVEN = Counter(
    "conveyor_jobs_redriven",
    "Jobs housekeeping took in hand: promoted (due after a delay or a retry backoff), "
    "reaped (their worker went silent; they retry or fail as their attempts allow), "
    "reconciled (missing from the broker, published again).",
    ["reason"],
)
JOBS_DISPATCHED = Counter(
    "conveyor_jobs_dispatched",
    "Jobs the dispatcher handed to the broker (they waited in the ledger: held at submit by "
    "a limit, a pause or a busy queue, promoted, sent back by a claim, or their publish "
    "failed).",
    ["queue"],
)
SCHEDULE_FIRES_SKIPPED = Counter(
    "conveyor_schedule_fires_skipped",
    "Schedule occurrences beat did not fire, by reason: quota (the schedule's tenant was at "
    "its quota of unfinished jobs).",
    ["reason"],
)
JOB_RUN_SECONDS = Histogram(
    "conveyor_job_run_seconds",
    "Time a job's function ran, per attempt.",
    ["type"],
    buckets=RUN_BUCKETS,
)
JOB_QUEUE_WAIT_SECONDS = Histogram(
    "conveyor_job_queue_wait_seconds",
    "Time from a job falling due (created, or its delay or backoff over) to a worker claiming it.",
    ["type"],
    buckets=WAIT_BUCKETS,
)


class QueueCollector(Collector):
    """Queue depth, oldest waiting job, running jobs and live workers, read at scrape time."""

    def __init__(self, read: Callable[[], tuple[list[QueueStats], list[WorkerInfo] | None]]):
        self._read = read

    def collect(self) -> Iterator[Metric]:
        """Ask the broker, the ledger and the workers; yield one gauge family each."""
        try:
            queues, workers = self._read()
        except Exception:  # a scrape must not fail because one dependency is down
            logger.warning("queue metrics unavailable", exc_info=True)
            return
        now = datetime.now(UTC)
        depth = GaugeMetricFamily(
            "conveyor_queue_depth", "Messages waiting in the broker, per queue.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "conveyor_queue_oldest_job_age_seconds",
            "Age of the oldest queued job per queue, from the ledger (0 when none waits).",
            labels=["queue"],
        )
        running = GaugeMetricFamily(
            "conveyor_jobs_running", "Jobs running now, per queue (ledger).", labels=["queue"]
        )
        for queue in queues:
            if queue.depth is not None:
                depth.add_metric([queue.name], queue.depth)
            oldest.add_metric([queue.name], queue.oldest_age(now) or 0.0)
            running.add_metric([queue.name], queue.running)
        yield from (depth, oldest, running)
        if workers is not None:
            yield GaugeMetricFamily(
                "conveyor_workers_online",
                "Celery workers that answered a broadcast.",
                value=len(workers),
            )


class FlowCollector(Collector):
    """Limits' running and waiting jobs, and why queued jobs wait, read at scrape time."""

    def __init__(self, read: Callable[[], FlowStats]):
        self._read = read

    def collect(self) -> Iterator[Metric]:
        """Ask the ledger; yield one gauge family each."""
        try:
            stats = self._read()
        except Exception:  # a scrape must not fail because the database is down
            logger.warning("flow metrics unavailable", exc_info=True)
            return
        labels = ["tenant", "key"]
        running = GaugeMetricFamily(
            "conveyor_limit_running", "Jobs holding a slot of a limit now.", labels=labels
        )
        waiting = GaugeMetricFamily(
            "conveyor_limit_waiting", "Queued jobs of a limit not started yet.", labels=labels
        )
        for tenant, key, n_running, n_waiting in stats.limits:
            running.add_metric([tenant, key], n_running)
            waiting.add_metric([tenant, key], n_waiting)
        reasons = GaugeMetricFamily(
            "conveyor_jobs_waiting",
            "Queued jobs not handed to the broker yet, per queue and why they wait.",
            labels=["queue", "reason"],
        )
        for queue, reason, n in stats.waiting:
            reasons.add_metric([queue, reason], n)
        yield from (running, waiting, reasons)


class _Union(Collector):
    """Several registries scraped as one (in-memory mode: the app's and the default)."""

    def __init__(self, registries: Iterable[Collector]):
        self._registries = list(registries)

    def collect(self) -> Iterator[Metric]:
        """Yield every registry's metrics."""
        for registry in self._registries:
            yield from registry.collect()


def scrape_registry(*extra: Collector, local: Iterable[Collector] = ()) -> CollectorRegistry:
    """Build the registry one scrape renders: every process's samples, plus `extra`.

    In multiprocess mode the files of all processes are read; otherwise this process's
    default registry and any `local` ones (a Flask app's own) are.
    """
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path:
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Union([REGISTRY, *local]))
    for collector in extra:
        registry.register(collector)
    return registry


def token_matches(expected: str, authorization: str | None) -> bool:
    """Return whether `Authorization: Bearer <token>` carries `expected` (constant time)."""
    scheme, _, given = (authorization or "").partition(" ")
    # Bytes, not str: compare_digest raises on a non-ASCII str, and header bytes are anyone's.
    # UTF-8 with surrogatepass encodes every str there is.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def usable_accept(accept: str | None) -> str:
    """Return `accept` if prometheus_client can pick a format by it, else "" (plain text).

    Its `choose_encoder` raises TypeError on a version it cannot compare, such as `1.x`.
    """
    try:
        choose_encoder(accept or "")
    except TypeError:
        return ""
    return accept or ""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the log."""


def serve_metrics(address: str, port: int, token: str) -> ThreadingWSGIServer | None:
    """Serve `/metrics` for a worker or beat process on a daemon thread.

    Returns None if the port is taken (a second worker on one host): that costs the
    metrics, not the process.
    """
    exposition = make_wsgi_app(scrape_registry())

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if token and not token_matches(token, environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer")])
            return [b"send Authorization: Bearer <CONVEYOR_METRICS_TOKEN>\n"]
        environ["HTTP_ACCEPT"] = usable_accept(environ.get("HTTP_ACCEPT"))
        result: Iterable[bytes] = exposition(environ, start_response)
        return result

    try:
        server = make_server(address, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError:
        logger.warning("metrics exporter could not listen on %s:%s", address, port, exc_info=True)
        return None
    threading.Thread(target=server.serve_forever, name="conveyor-metrics", daemon=True).start()
    logger.info("metrics exporter listening on %s:%s", address, port)
    return server
