"""The baseline worker: a Celery task that marks the row done, and a raw no-op task.

Built by Conveyor's own `create_celery`, so acks_late, prefetch and events match the
Conveyor worker exactly, plus the Redis result backend a bare Celery stack keeps its task
states in (Conveyor keeps them in its ledger and its own Redis keys instead).
Run as `celery -A bench.bare_worker worker -Q bare`.
"""

from __future__ import annotations

import os

from sqlalchemy import create_engine, text

from conveyor.broker.config import create_celery
from conveyor.settings import Settings

settings = Settings(database_url=os.environ["BARE_DATABASE_URL"])
app = create_celery(settings, name="bare-worker")
app.conf.update(result_backend=settings.result_backend, result_expires=settings.result_expires)
engine = create_engine(settings.sqlalchemy_url, pool_size=2, max_overflow=2)


@app.task(name="bare.run")
def run(job_id: int) -> None:
    """Mark one job succeeded, as the simplest ledger-keeping task would."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE bare_jobs SET state = 'succeeded', finished_at = now() WHERE id = :id"),
            {"id": job_id},
        )


@app.task(name="bare.noop")
def noop() -> None:
    """Do nothing: raw Celery's cost per task."""
