"""gunicorn's configuration for the API: `gunicorn --config python:api.gunicorn_config ...`.

The Procfile's `web` command and compose's `api` command both load it. Bind address and
worker count stay on the command line, where an operator expects them.
"""

from __future__ import annotations

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


def on_starting(_server: Any) -> None:
    """Set up logging in the master, so its own lines (workers booting, dying) are data too."""
    configure_logging(Settings())


def child_exit(_server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges; its counters stay, so totals never go backwards."""
    from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

    GunicornPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


# gunicorn 23+ opens a control socket at one path per user ($HOME/.gunicorn/gunicorn.ctl):
# two API instances on one host would fight over it, and Conveyor never uses it.
control_socket_disable = True
