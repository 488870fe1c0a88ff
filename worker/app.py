"""The Celery app factory: one task per job type, plus the housekeeping tasks beat fires."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import setup_logging, worker_process_init
from kombu import Queue

from conveyor.broker import CeleryPublisher, Message, create_celery
from conveyor.db import create_db_engine, create_session_factory
from conveyor.jobs import promote_due_jobs
from conveyor.logs import configure_logging
from conveyor.registry import JobType, load_job_types
from conveyor.settings import Settings
from worker.runner import WorkerServices, run_job, utcnow

logger = logging.getLogger(__name__)
PROMOTE_TASK = "conveyor.promote_due_jobs"
# Beat asks for a promotion this often; a promotion that could not run within
# PROMOTE_EXPIRES seconds is dropped, so an idle worker never faces a pile of them.
PROMOTE_INTERVAL = 1.0
PROMOTE_EXPIRES = 10


def create_celery_app(settings: Settings | None = None) -> Celery:
    """Build the worker's Celery app from settings; importing or building it connects nothing."""
    settings = settings or Settings()
    app = create_celery(settings, name="conveyor-worker", with_result_backend=True)
    engine = create_db_engine(settings)
    services = WorkerServices(
        settings=settings,
        engine=engine,
        sessions=create_session_factory(engine),
        registry=load_job_types(settings.job_modules),
    )
    app.conveyor = services
    queues = {settings.default_queue} | {jt.queue for jt in services.registry if jt.queue}
    app.conf.task_queues = [Queue(name) for name in sorted(queues)]
    for job_type in services.registry:
        _register_job_task(app, services, job_type)
    _register_housekeeping(app, services)

    @worker_process_init.connect(weak=False)
    def _fresh_pool_after_fork(**_: Any) -> None:
        # Connections must never cross a fork; each pool child opens its own.
        engine.dispose(close=False)

    @setup_logging.connect(weak=False)
    def _keep_our_logging(**_: Any) -> None:
        configure_logging(settings)

    return app


def _register_job_task(app: Celery, services: WorkerServices, job_type: JobType) -> None:
    """Register a task named after the job type, so Flower shows jobs by type."""
    limit = job_type.time_limit
    if limit is not None and limit >= services.settings.visibility_timeout:
        # Redis would hand the message to a second worker while the first still runs it.
        msg = (
            f"job type {job_type.name} may run {limit}s, longer than the broker's "
            f"visibility timeout ({services.settings.visibility_timeout}s)"
        )
        raise ValueError(msg)

    def execute(task: Task, job_id: str) -> str:
        return run_job(services, task, job_id)

    app.task(
        name=job_type.name,
        bind=True,
        ignore_result=True,
        soft_time_limit=job_type.soft_time_limit,
        time_limit=job_type.time_limit,
    )(execute)


def _register_housekeeping(app: Celery, services: WorkerServices) -> None:
    """Register the promoter and schedule it on beat."""
    publisher = CeleryPublisher(app)

    @app.task(name=PROMOTE_TASK, ignore_result=True)
    def promote() -> int:
        with services.sessions.begin() as session:
            jobs = promote_due_jobs(session, utcnow())
            # Published before the commit: a worker that gets the id first waits on the
            # row lock and then sees it queued. If the commit fails the claim finds
            # nothing to run and the next promotion publishes again.
            publisher.publish(Message(j.id, j.type, j.queue) for j in jobs)
        if jobs:
            logger.info("promoted %d jobs", len(jobs))
        return len(jobs)

    app.conf.beat_schedule = {
        "promote-due-jobs": {
            "task": PROMOTE_TASK,
            "schedule": PROMOTE_INTERVAL,
            "options": {"expires": PROMOTE_EXPIRES},
        },
    }
