"""Entry point for the Celery CLI: `celery -A worker.main worker|beat|flower`."""

from __future__ import annotations

from conveyor.telemetry.metrics_dir import prepare_multiprocess_dir

# Before anything imports prometheus_client: prefork children then write their samples
# where the main process's exporter can sum them (see conveyor.telemetry.metrics_dir).
prepare_multiprocess_dir("celery")

from conveyor.settings import Settings  # noqa: E402
from conveyor.telemetry.logs import configure_logging  # noqa: E402
from worker.app import create_celery_app  # noqa: E402

# The one module that builds an app at import: the Celery CLI needs an attribute to load.
settings = Settings()
# Before Celery says anything: its start-up warnings (running as root) are log lines too.
configure_logging(settings)
app = create_celery_app(settings)
