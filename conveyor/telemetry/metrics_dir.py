"""A private, empty Prometheus multiprocess directory for each process tree that forks.

gunicorn's workers and Celery's prefork children each count in their own memory; with
`PROMETHEUS_MULTIPROC_DIR` set, prometheus_client writes every sample to a file there
instead, and a scrape of any one process sums them all. prometheus_client picks that mode
when it is first imported, so this module does not import it and `prepare` runs early.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWNER = "CONVEYOR_METRICS_DIR_OWNER"


def prepare_multiprocess_dir(role: str) -> Path:
    """Point prometheus_client at an empty directory owned by this process; return it.

    With `PROMETHEUS_MULTIPROC_DIR` given (a tmpfs, say), a subdirectory per role and pid
    keeps an API and a worker on one host from reading or wiping each other's samples;
    it is emptied first, as a container restarting as pid 1 finds its old one. Unset, a
    fresh temporary directory serves. Either is removed when this process exits.
    """
    if os.environ.get(_OWNER) == str(os.getpid()):
        return Path(os.environ[ENV])  # already prepared here (gunicorn re-reads its config)
    given = os.environ.get(ENV)
    if given:
        path = Path(given) / f"{role}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    else:
        path = Path(tempfile.mkdtemp(prefix=f"conveyor-{role}-metrics-"))
    os.environ[ENV] = str(path)
    os.environ[_OWNER] = str(os.getpid())
    atexit.register(_remove, path, os.getpid())
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        # Imported already: the `celery` command loads Flower's CLI plugin, which imports
        # prometheus_client before the app named by `-A` loads. Metrics built from here on (ours)
        # read the class anew; the mode is only fixed by the first import by default.
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    return path


def multiprocess_dir() -> str | None:
    """Return the multiprocess directory, or None when this process counts in memory."""
    return os.environ.get(ENV) or None


def _remove(path: Path, owner: int) -> None:
    # Forked children inherit atexit hooks; only the process that made the directory may
    # remove it, or a gunicorn worker's exit would wipe its siblings' samples.
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)
