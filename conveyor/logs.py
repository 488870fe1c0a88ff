"""Logging set-up shared by the api, worker and beat processes."""

from __future__ import annotations

import logging

from conveyor.settings import Settings


def configure_logging(settings: Settings) -> None:
    """Send every logger, Celery's and warnings included, to stderr (unless already set up)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(processName)s: %(message)s",
    )
    logging.captureWarnings(True)
