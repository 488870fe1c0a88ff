"""Measure the worker's peak memory while `orders.import_csv` imports a large generated CSV.

Usage: .venv/bin/python bench/import_memory.py [ROWS]   (default 1,000,000)
Starts throwaway embedded PostgreSQL and Valkey and one prefork Celery worker process
(concurrency 1), like the Procfile; prints rows, seconds and the worker child's peak RSS.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
from alembic import command
from alembic.config import Config

from conveyor.bootstrap import create_tenant_identity
from conveyor.broker import CeleryPublisher, Message, create_celery
from conveyor.db import create_db_engine, create_session_factory
from conveyor.embedded import create_database, embedded_services
from conveyor.files import store_upload
from conveyor.models import Job
from conveyor.registry import load_job_types
from conveyor.settings import Settings
from conveyor.submit import JobRequest, submit_jobs

ROOT = Path(__file__).resolve().parent.parent


def rows(count: int):
    """Yield a CSV with `count` valid order rows, in ~1 MiB chunks."""
    buffer = [b"order_id,customer_email,amount,currency,ordered_at\n"]
    size = 0
    for n in range(count):
        amount = f"{n % 997}.{n % 100:02d}"
        line = f"O-{n},c{n % 5000}@example.com,{amount},EUR,2026-03-{1 + n % 28:02d}T10:00:00Z\n"
        buffer.append(line.encode())
        size += len(line)
        if size >= 1024 * 1024:
            yield b"".join(buffer)
            buffer, size = [], 0
    yield b"".join(buffer)


def main() -> None:
    """Run the measurement and print its figures."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with (
        tempfile.TemporaryDirectory() as tmp,
        embedded_services(Path(tmp), persist=False) as (pg, redis_url),
    ):
        url = create_database(pg, "conveyor")
        settings = Settings(database_url=url, redis_url=redis_url, default_queue="import-bench")
        config = Config(str(ROOT / "alembic.ini"))
        config.set_main_option("sqlalchemy.url", settings.sqlalchemy_url.replace("%", "%%"))
        command.upgrade(config, "head")
        engine = create_db_engine(settings)
        sessions = create_session_factory(engine)
        registry = load_job_types(settings.job_modules)
        with sessions.begin() as session:
            identity = create_tenant_identity(
                session,
                settings.secret_key,
                tenant_name="Bench",
                email="b@example.com",
                now=datetime.now(UTC),
            )
            upload = store_upload(session, identity.tenant.id, "big.csv", "text/csv", rows(count))
            size = upload.size
            (job,) = submit_jobs(
                session,
                registry,
                [JobRequest(type="orders.import_csv", payload={"upload_id": str(upload.id)})],
                tenant_id=identity.tenant.id,
                default_queue=settings.default_queue,
                now=datetime.now(UTC),
            )
        env = {
            **os.environ,
            "CONVEYOR_DATABASE_URL": url,
            "CONVEYOR_REDIS_URL": redis_url,
            "CONVEYOR_DEFAULT_QUEUE": "import-bench",
            "CONVEYOR_LOG_LEVEL": "WARNING",
        }
        worker = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("celery")),
                "-A",
                "worker.main",
                "worker",
                "--concurrency=1",
                "--loglevel=WARNING",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started = time.monotonic()
        CeleryPublisher(create_celery(settings, name="bench", with_result_backend=False)).publish(
            [Message.of(job)]
        )
        peak = 0
        state = "queued"
        try:
            while time.monotonic() - started < 1800:
                for proc in [psutil.Process(worker.pid), *psutil.Process(worker.pid).children()]:
                    with contextlib.suppress(psutil.Error):
                        peak = max(peak, proc.memory_info().rss)
                with sessions() as session:
                    found = session.get_one(Job, job.id)
                    state, result = found.state, found.result
                if state in {"succeeded", "failed"}:
                    break
                time.sleep(0.2)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
            engine.dispose()
        seconds = time.monotonic() - started
        counts = {k: result[k] for k in ("imported", "rejected")} if result else None
        print(f"rows {count:,}  file {size / 1e6:.1f} MB  state {state}  result {counts}")
        rate = count / seconds
        print(f"import {seconds:.1f} s ({rate:,.0f} rows/s)  worker peak RSS {peak / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
