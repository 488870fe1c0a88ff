"""Entry point for the Celery CLI: `celery -A worker.main worker|beat|flower`."""

from __future__ import annotations

from conveyor.logs import configure_logging
from conveyor.settings import Settings
from worker.app import create_celery_app

# The one module that builds an app at import: the Celery CLI needs an attribute to load.
settings = Settings()
# Before Celery says anything: its start-up warnings (running as root) are log lines too.
configure_logging(settings)
app = create_celery_app(settings)
