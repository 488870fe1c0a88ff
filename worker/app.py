"""The Celery app factory: one task per job type; beat runs the housekeeping."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import (
    beat_init,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_ready,
)
from kombu import Queue
from redis import Redis

from conveyor.broker.config import create_celery
from conveyor.broker.publisher import REQUEST_ID_HEADER, CeleryPublisher
from conveyor.db import create_db_engine
from conveyor.ledger.gate import SubmitGate
from conveyor.ledger.work import Work
from conveyor.live.store import LiveStore
from conveyor.plugins import job_registry
from conveyor.registry import JobType
from conveyor.settings import Settings
from conveyor.telemetry.logs import bind_context, clear_context, configure_logging
from conveyor.telemetry.metrics import serve_metrics
from conveyor.telemetry.tracing import install_tracing
from worker.consumer import install as install_loop_bound_consumer
from worker.housekeeping import Housekeeper
from worker.runner import WorkerServices, fail_timed_out, run_job
from worker.timers import install as install_timer_purge

logger = logging.getLogger(__name__)


def create_celery_app(settings: Settings | None = None) -> Celery:
    """Build the worker's Celery app from settings; importing or building it connects nothing."""
    settings = settings or Settings()
    app = create_celery(settings, name="conveyor-worker")
    engine = create_db_engine(settings)
    # Connects on first use; redis-py reconnects in each forked pool child.
    live = LiveStore(
        Redis.from_url(settings.result_backend, socket_timeout=5), settings.result_expires
    )
    # Workers queue nothing themselves; beat's housekeeping (this app too) publishes.
    work = Work(engine, live, CeleryPublisher(app))
    services = WorkerServices(
        settings=settings,
        engine=engine,
        work=work,
        registry=job_registry(settings),
        gate=SubmitGate.for_settings(settings, live.redis, work.reading),
    )
    app.conveyor = services
    app.conf.task_queues = [Queue(name) for name in consumed_queues(settings, services)]
    for job_type in services.registry:
        _register_job_task(app, services, job_type)
    # Every job has a time limit: drop each one's cancelled timer once it has finished.
    install_timer_purge(app)
    # A thread-pool worker must not touch its broker connection outside its event loop.
    install_loop_bound_consumer(app)
    if settings.amqp_broker:
        _warn_of_consumer_timeout(services)

    @beat_init.connect(weak=False)
    def _start_housekeeping(**_: Any) -> None:
        install_tracing(settings, "conveyor-beat")
        Housekeeper.for_app(app).start()
        if settings.beat_metrics_port:
            serve_metrics(
                settings.metrics_address,
                settings.beat_metrics_port,
                settings.metrics_token.get_secret_value(),
            )

    @worker_ready.connect(weak=False)
    def _start_exporter(**_: Any) -> None:
        # In the main process, once the pool has forked: prefork children write their
        # samples to the multiprocess directory (worker.main), and this one sums them.
        if settings.worker_metrics_port:
            serve_metrics(
                settings.metrics_address,
                settings.worker_metrics_port,
                settings.metrics_token.get_secret_value(),
            )

    @worker_process_init.connect(weak=False)
    def _fresh_pool_after_fork(**_: Any) -> None:
        # Connections must never cross a fork; each pool child opens its own.
        engine.dispose(close=False)
        # The exporter's thread too: a prefork (or solo) pool's process traces from here.
        install_tracing(settings, "conveyor-worker")

    @worker_init.connect(weak=False)
    def _trace_threaded_pool(sender: Any = None, **_: Any) -> None:
        # Pools that send no worker_process_init (threads, gevent) run jobs in this process.
        pool = getattr(sender, "pool_cls", None) or ""
        name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
        if not any(kind in name for kind in ("prefork", "processes", "solo")):
            install_tracing(settings, "conveyor-worker")

    @setup_logging.connect(weak=False)
    def _keep_our_logging(**_: Any) -> None:
        configure_logging(settings)

    # Module-level receivers with a uid: building a second app does not connect them twice.
    task_prerun.connect(_bind_job_context, weak=False, dispatch_uid="conveyor-bind-job")
    task_postrun.connect(_clear_job_context, weak=False, dispatch_uid="conveyor-clear-job")
    return app


def _bind_job_context(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    """Give every line logged while a job runs, Celery's own included, its id and type."""
    clear_context()
    if task is None:
        return
    request_id = (task.request.headers or {}).get(REQUEST_ID_HEADER)
    bind_context(job_id=task_id, job_type=task.name, request_id=request_id)


def _clear_job_context(**_: Any) -> None:
    clear_context()


def consumed_queues(settings: Settings, services: WorkerServices) -> list[str]:
    """Return every queue a job type may run on, in the order workers should drain them."""
    names = {settings.default_queue}
    for job_type in services.registry:
        names.update(job_type.queues(settings.default_queue))
    first = [name for name in settings.queue_order if name in names]
    return first + sorted(names - set(first))


def _warn_of_consumer_timeout(services: WorkerServices) -> None:
    """Name the job types that may outrun RabbitMQ's consumer_timeout, once, at start.

    A warning, not a refusal as for Redis' visibility timeout: stock RabbitMQ times out
    after 30 minutes while Conveyor's defaults allow longer jobs, and outrunning it stays
    safe (the channel is reopened, the requeued message is skipped by the claim guard, the
    job finishes once). It only costs a reconnect and a wasted delivery; raising
    consumer_timeout in rabbitmq.conf avoids both.
    """
    settings = services.settings
    limits = {t.name: t.time_limit or settings.default_time_limit for t in services.registry}
    slow = [
        f"{name} ({limit}s)"
        for name, limit in sorted(limits.items())
        if limit >= settings.amqp_consumer_timeout
    ]
    if slow:
        logger.warning(
            "job types may run longer than RabbitMQ's consumer_timeout (%ds): %s. "
            "Raise consumer_timeout in rabbitmq.conf above the longest, and "
            "CONVEYOR_AMQP_CONSUMER_TIMEOUT with it",
            settings.amqp_consumer_timeout,
            ", ".join(slow),
        )


def _register_job_task(app: Celery, services: WorkerServices, job_type: JobType) -> None:
    """Register a task named after the job type, so Flower shows jobs by type."""
    limit = job_type.time_limit or services.settings.default_time_limit
    # The visibility timeout is Redis' alone; RabbitMQ's consumer_timeout is checked apart.
    if not services.settings.amqp_broker and limit >= services.settings.visibility_timeout:
        # Redis would hand the message to a second worker while the first still runs it.
        msg = (
            f"job type {job_type.name} may run {limit}s, longer than the broker's "
            f"visibility timeout ({services.settings.visibility_timeout}s)"
        )
        raise ValueError(msg)

    def execute(job_id: str) -> str:
        return run_job(services, job_id)

    class JobTask(Task):
        def on_failure(self, exc: Exception, task_id: str, *_: Any) -> None:
            # Celery calls this in the worker's main process when the hard time limit
            # kills the child running the job; other failures never leave run_job.
            if isinstance(exc, TimeLimitExceeded):
                fail_timed_out(services, task_id, exc)

    app.task(
        name=job_type.name,
        base=JobTask,
        # Not shared: each app's task closes over that app's services.
        shared=False,
        ignore_result=True,
        soft_time_limit=job_type.soft_time_limit,
        time_limit=limit,
    )(execute)
