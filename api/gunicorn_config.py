"""gunicorn's configuration for the API: `gunicorn --config python:api.gunicorn_config ...`.

The Procfile's `web` command, compose's `api` command and the image's CMD all load it. Bind
address and worker count stay on the command line, where an operator expects them.

Workers are gevent's: an event stream or a long poll waits in a greenlet, so a worker holds
thousands of idle connections and keeps connections alive (sync workers close each one).
Chosen over granian and gthread, measured in bench/README.md ("Live status"). gevent patches
the standard library when a worker starts, before it imports the app; the app must not be
preloaded into the master (no `--preload`), or psycopg, imported before the patch, would run
one query at a time (shared/PITFALLS.md): a test holds the master free of psycopg.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from gunicorn import glogging

from conveyor.settings import Settings
from conveyor.telemetry.logs import configure_logging
from conveyor.telemetry.metrics_dir import prepare_multiprocess_dir

# In the master, before any worker imports prometheus_client: an empty directory where
# every worker writes its samples, so a scrape of any one of them reports the sum.
prepare_multiprocess_dir("api")


class StructuredLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's error and access logs as structured lines through Conveyor's logging."""

    def setup(self, cfg: Any) -> None:
        """Let gunicorn's loggers propagate to the root handler instead of their own."""
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in [h for h in log.handlers if getattr(h, "_gunicorn", False)]:
                log.removeHandler(handler)
            log.propagate = True

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        """Log one request as fields; the path without its query string, which may hold data."""
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        self.access_log.info(
            "%s %s %s",
            atoms["m"],
            atoms["U"],
            atoms["s"],
            extra={
                "method": atoms["m"],
                "path": atoms["U"],
                "status": int(atoms["s"]) if str(atoms["s"]).isdigit() else atoms["s"],
                "duration_ms": round(int(atoms["D"]) / 1000, 3),
                "request_id": atoms.get("{x-request-id}o") or None,
                "remote_addr": atoms["h"],
            },
        )


logger_class = StructuredLogger


def on_starting(server: Any) -> None:
    """Set up logging in the master, so its own lines (workers booting, dying) are data too."""
    if server.cfg.preload_app and server.cfg.worker_class_str == "gevent":
        # The app imported before gevent patched the standard library: psycopg would run
        # one query at a time per worker, silently.
        raise SystemExit("api.gunicorn_config: gevent workers must not --preload the API")
    configure_logging(Settings())


def post_worker_init(worker: Any) -> None:
    """End the worker's event streams as soon as it is asked to stop, not after graceful_timeout.

    A stream never ends by itself; its client reconnects (to another worker or instance) with
    Last-Event-ID and loses nothing.
    """
    hub = worker.wsgi.extensions["conveyor"].hub

    def watch() -> None:
        while worker.alive:
            time.sleep(0.5)
        hub.close()

    threading.Thread(target=watch, name="stream-closer", daemon=True).start()


def child_exit(_server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges; its counters stay, so totals never go backwards."""
    from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

    GunicornPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


worker_class = "gevent"
# Open connections per worker: streams, long polls and plain requests together
# (`--worker-connections` on the command line overrides it).
worker_connections = 2000
# Seconds an idle keep-alive connection stays open between requests (behind a proxy, keep
# it under the proxy's own idle timeout).
keepalive = 5

# gunicorn 23+ opens a control socket at one path per user ($HOME/.gunicorn/gunicorn.ctl):
# two API instances on one host would fight over it, and Conveyor never uses it.
control_socket_disable = True
