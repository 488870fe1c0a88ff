"""Start Flower: a login always, history under the data directory, `/metrics` behind the login.

Flower 2.2 leaves `/metrics` (task names, worker names, counts) open even with basic auth
on (mher/flower#1129), so this launcher runs Flower in-process with that one handler
swapped for an authenticated one, rather than exec-ing `celery flower`.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from conveyor.settings import Settings

logger = logging.getLogger(__name__)
# A crash loses at most this much of Flower's history (milliseconds); a clean stop none.
STATE_SAVE_INTERVAL_MS = 60_000


def flower_credentials(settings: Settings) -> tuple[str, str]:
    """Return Flower's user and password; in development make a password up if none is set.

    Outside development, no password means no Flower. A made-up password is written to a
    private file under the data directory, never to the log.
    """
    if settings.flower_user and settings.flower_password:
        return settings.flower_user, settings.flower_password.get_secret_value()
    if settings.env != "development" or not settings.flower_user:
        raise SystemExit("refusing to start Flower without CONVEYOR_FLOWER_USER/PASSWORD")
    path = Path(settings.data_dir) / "flower-password"
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    path.write_text(password + "\n")
    path.chmod(0o600)
    logger.warning("CONVEYOR_FLOWER_PASSWORD is unset: this run's password is in %s", path)
    return settings.flower_user, password


def flower_environment(settings: Settings) -> dict[str, str]:
    """Return Flower's options as `FLOWER_*` variables, so no secret appears in `ps`."""
    user, password = flower_credentials(settings)
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "FLOWER_BASIC_AUTH": f"{user}:{password}",
        "FLOWER_ADDRESS": settings.flower_address,
        "FLOWER_PORT": str(settings.flower_port),
        # Task history survives restarts in a shelve file under the data directory.
        "FLOWER_PERSISTENT": "true",
        "FLOWER_DB": str(data_dir / "flower.db"),
        "FLOWER_STATE_SAVE_INTERVAL": str(STATE_SAVE_INTERVAL_MS),
    }
    if settings.flower_url_prefix.strip("/"):
        env["FLOWER_URL_PREFIX"] = settings.flower_url_prefix.strip("/")
    return env


def protect_flower_metrics() -> None:
    """Make Flower's `/metrics` ask for the same login as its pages."""
    from flower import urls
    from flower.views.monitor import Metrics
    from tornado import web

    class AuthenticatedMetrics(Metrics):
        @web.authenticated
        async def get(self) -> None:
            await super().get()

    # Flower builds its routes from this list when it starts; swap the entry in place.
    urls.handlers[:] = [
        (entry[0], AuthenticatedMetrics) if _handler_of(entry) is Metrics else entry
        for entry in urls.handlers
    ]


def _handler_of(entry: Any) -> Any:
    return entry[1] if isinstance(entry, tuple) else getattr(entry, "handler_class", None)


def main() -> None:
    """Run `celery -A worker.main flower` in this process, with Conveyor's settings."""
    os.environ.update(flower_environment(Settings()))
    protect_flower_metrics()
    from celery.bin.celery import main as celery_main

    sys.argv = [str(Path(sys.executable).with_name("celery")), "-A", "worker.main", "flower"]
    celery_main()


if __name__ == "__main__":
    main()
