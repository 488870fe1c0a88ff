"""A workflow across processes: a prefork worker, the dispatcher's own thread, the API.

The verdict comes from the ledger: each job's start and success are events in
`job_events`, numbered in the order PostgreSQL wrote them, so a child's start must come
after every parent's success, and each job starts exactly once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_lists
from conveyor.cli import main
from conveyor.client import Client
from conveyor.ledger.states import JobState
from conveyor.models import JobEvent, Workflow
from conveyor.settings import Settings
from tests.conftest import bearer, wait_for
from tests.processes import own_queue, start_worker
from worker.app import create_celery_app
from worker.dispatcher import Dispatcher

WIDTH = 8


@pytest.fixture
def api(app: Any, identity: Identity) -> Iterator[Client]:
    """A client wired to the in-process app."""
    with Client(
        "http://conveyor.test", identity.token, transport=httpx.WSGITransport(app=app)
    ) as c:
        yield c


def test_a_diamond_runs_each_job_once_and_no_child_before_its_parents(
    settings: Settings,
    identity: Identity,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    redis_client: Redis,
) -> None:
    mine = own_queue(settings, "workflow")
    api = create_app(mine)
    client = api.test_client()
    auth = bearer(identity.token)
    sleep = {"type": "system.sleep", "payload": {"seconds": 0.05}}
    jobs = [
        {"ref": "start", **sleep},
        *({"ref": f"mid-{n}", **sleep, "depends_on": ["start"]} for n in range(WIDTH)),
        {"ref": "end", **sleep, "depends_on": [f"mid-{n}" for n in range(WIDTH)]},
    ]
    workers = [start_worker(mine, tmp_path, concurrency=2)]
    worker_app = create_celery_app(mine)
    dispatcher = Dispatcher.for_app(worker_app)
    dispatcher.start()
    try:
        answer = client.post("/v1/workflows", json={"name": "diamond", "jobs": jobs}, headers=auth)
        assert answer.status_code == 202, answer.get_json()
        flow = answer.get_json()

        def finished() -> bool:
            with sessions() as session:
                state = session.scalar(
                    select(Workflow.state).where(Workflow.id == uuid.UUID(flow["id"]))
                )
            return state != "running"

        wait_for(finished, timeout=90, interval=0.2)
        shown = client.get(f"/v1/workflows/{flow['id']}", headers=auth).get_json()
    finally:
        dispatcher.stop()
        for worker in workers:
            worker.stop()
        worker_app.conveyor.engine.dispose()
        api.extensions["conveyor"].engine.dispose()
        if not mine.amqp_broker:
            redis_client.delete(*queue_lists(mine.default_queue))
    assert shown["state"] == "succeeded"
    ids = {job["ref"]: uuid.UUID(job["id"]) for job in shown["jobs"]}
    with sessions() as session:
        events = session.execute(
            select(JobEvent.id, JobEvent.job_id, JobEvent.to_state).where(
                JobEvent.job_id.in_(ids.values())
            )
        ).all()
    starts = {e.job_id: e.id for e in events if e.to_state == JobState.RUNNING}
    successes = {e.job_id: e.id for e in events if e.to_state == JobState.SUCCEEDED}
    assert sum(1 for e in events if e.to_state == JobState.RUNNING) == len(ids)  # once each
    for job in shown["jobs"]:
        for parent in job["depends_on"]:
            assert starts[ids[job["ref"]]] > successes[ids[parent]], (job["ref"], parent)


def test_the_cli_draws_a_workflow_as_a_tree(client: Any, auth: dict[str, str], api: Any) -> None:
    jobs = [
        {"ref": "extract", "type": "system.noop"},
        {"ref": "load", "type": "system.noop", "depends_on": ["extract"]},
        {"ref": "index", "type": "system.noop", "depends_on": ["extract"]},
        {"ref": "report", "type": "system.noop", "depends_on": ["load", "index"]},
    ]
    flow = client.post("/v1/workflows", json={"name": "etl", "jobs": jobs}, headers=auth)
    shown = CliRunner().invoke(
        main, ["workflow", "show", flow.get_json()["id"]], obj={"client": api}
    )
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("etl (")
    assert lines[0].endswith("): running")
    assert lines[1] == "└── extract [system.noop] queued"
    assert lines[2] == "    ├── index [system.noop] scheduled, waiting for dependencies"
    assert lines[3] == "    └── load [system.noop] scheduled, waiting for dependencies"
    assert lines[4] == (
        "        └── report [system.noop] scheduled, waiting for dependencies  (also after index)"
    )
    listed = CliRunner().invoke(main, ["workflow", "list"], obj={"client": api})
    assert flow.get_json()["id"] in listed.output


def test_the_cli_submits_a_workflow_from_a_file(api: Any) -> None:
    body = {
        "name": "from-a-file",
        "jobs": [
            {"ref": "a", "type": "system.noop"},
            {
                "ref": "b",
                "type": "system.noop",
                "depends_on": ["a"],
                "on_dependency_failure": "run",
            },
        ],
    }
    submitted = CliRunner().invoke(
        main, ["workflow", "submit", "-"], input=json.dumps(body), obj={"client": api}
    )
    assert submitted.exit_code == 0, submitted.output
    lines = submitted.stdout.splitlines()
    assert lines[0].startswith("from-a-file (")
    assert lines[1:] == [
        "└── a [system.noop] queued",
        "    └── b [system.noop] scheduled, waiting for dependencies",
    ]
