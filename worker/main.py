"""Entry point for the Celery CLI: `celery -A worker.main worker|beat|flower`."""

from __future__ import annotations

from worker.app import create_celery_app

# The one module that builds an app at import: the Celery CLI needs an attribute to load.
app = create_celery_app()
