"""A limit across processes: two prefork workers, the dispatcher's own thread, the API.

The verdict comes from the ledger: each job's start and finish are events in `job_events`,
numbered in the order PostgreSQL wrote them. A claim that takes a freed slot waits for the
finish that freed it to commit, so its event comes after that finish's; replaying the
events in order therefore counts how many jobs held a slot at once.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_lists
from conveyor.ledger.states import JobState
from conveyor.models import Job, JobEvent, Limit
from conveyor.settings import Settings
from tests.conftest import bearer, most_at_once, wait_for
from tests.processes import own_queue, start_worker
from worker.app import create_celery_app
from worker.dispatcher import Dispatcher

JOBS = 12
MAX_RUNNING = 2


def test_most_at_once_counts_overlapping_runs() -> None:
    q, r, s = JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED
    assert most_at_once([(q, r), (r, s), (q, r), (r, s)]) == 1
    assert most_at_once([(q, r), (q, r), (r, s), (q, r), (r, s), (r, s)]) == 2
    assert most_at_once([("queued", "running"), ("running", "retrying")]) == 1


def test_two_worker_processes_never_run_more_than_max_running(
    settings: Settings,
    identity: Identity,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    redis_client: Redis,
) -> None:
    mine = own_queue(settings, "limited")
    api = create_app(mine)
    client = api.test_client()
    auth = bearer(identity.token)
    key = f"pair-{uuid.uuid4().hex[:6]}"
    put = client.put(f"/v1/limits/{key}", json={"max_running": MAX_RUNNING}, headers=auth)
    assert put.status_code == 200, put.get_json()
    # Four pool processes in all, twice the limit: only the limit can keep them at two.
    workers = [start_worker(mine, tmp_path, concurrency=2) for _ in range(2)]
    worker_app = create_celery_app(mine)
    dispatcher = Dispatcher.for_app(worker_app)
    dispatcher.start()
    try:
        job = {"type": "system.sleep", "payload": {"seconds": 0.2}, "limit_key": key}
        ids = [
            client.post("/v1/jobs", json=job, headers=auth).get_json()["id"] for _ in range(JOBS)
        ]

        def finished() -> bool:
            with sessions() as session:
                states = session.scalars(
                    select(Job.state).where(Job.id.in_([uuid.UUID(i) for i in ids]))
                ).all()
            return all(state == JobState.SUCCEEDED for state in states)

        wait_for(finished, timeout=90, interval=0.2)
    finally:
        dispatcher.stop()
        for worker in workers:
            worker.stop()
        worker_app.conveyor.engine.dispose()
        api.extensions["conveyor"].engine.dispose()
        if not mine.amqp_broker:
            redis_client.delete(*queue_lists(mine.default_queue))
    with sessions() as session:
        events = session.execute(
            select(JobEvent.from_state, JobEvent.to_state)
            .where(JobEvent.job_id.in_([uuid.UUID(i) for i in ids]))
            .order_by(JobEvent.id)
        ).all()
        slots = session.scalar(
            select(Limit.running).where(Limit.tenant_id == identity.tenant.id, Limit.key == key)
        )
    starts = [e for e in events if e.to_state == JobState.RUNNING]
    assert len(starts) == JOBS  # each ran once, no retries muddling the count
    # Held at the limit, and the limit was reached: the workers had room for more.
    assert most_at_once([(e.from_state, e.to_state) for e in events]) == MAX_RUNNING
    assert slots == 0  # every slot came back
