"""Start Flower for the worker app, with basic auth and persistent state from settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from conveyor.settings import Settings


def flower_environment(settings: Settings) -> dict[str, str]:
    """Return Flower's options as `FLOWER_*` variables, so no secret appears in `ps`."""
    if not settings.flower_user or not settings.flower_password:
        raise SystemExit("refusing to start Flower without CONVEYOR_FLOWER_USER/PASSWORD")
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    return {
        "FLOWER_BASIC_AUTH": f"{settings.flower_user}:{settings.flower_password}",
        "FLOWER_ADDRESS": settings.flower_address,
        "FLOWER_PORT": str(settings.flower_port),
        # Task history survives restarts in a shelve file under the data directory.
        "FLOWER_PERSISTENT": "true",
        "FLOWER_DB": str(data_dir / "flower.db"),
    }


def main() -> None:
    """Replace this process with `celery flower` (never returns)."""
    env = {**os.environ, **flower_environment(Settings())}
    celery = str(Path(sys.executable).with_name("celery"))
    os.execve(celery, [celery, "-A", "worker.main", "flower"], env)  # noqa: S606 - fixed argv


if __name__ == "__main__":
    main()
