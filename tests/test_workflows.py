"""Workflows on real PostgreSQL and Redis: ordering, failure, revival, cycles, fan-in, fan-out.

Jobs run through the worker's own `run_job`, called in-process so each test decides when
a job runs; a claim of a job still waiting for its dependencies finds nothing to claim.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel
from redis import Redis
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_lists
from conveyor.ledger.work import UnitOfWork
from conveyor.ledger.workflows import WorkflowRequest, create_workflow
from conveyor.models import Job, JobEvent, Workflow
from conveyor.registry import JobContext, JobRegistry
from conveyor.settings import Settings
from tests.conftest import bearer
from tests.factories import job_factory
from tests.test_api import assert_problem
from worker.app import create_celery_app
from worker.runner import run_job

NOOP = "system.noop"
FAIL = "system.fail"


@pytest.fixture(scope="module")
def worker_app(settings: Settings) -> Iterator[Any]:
    """Yield the worker's app (no worker runs: tests run jobs themselves)."""
    app = create_celery_app(settings.model_copy(update={"heartbeat_interval": 3600}))
    yield app
    app.conveyor.engine.dispose()


@pytest.fixture(autouse=True)
def _empty_queue(settings: Settings, redis_client: Redis) -> Iterator[None]:
    yield
    redis_client.delete(*queue_lists(settings.default_queue))


def post_workflow(client: Any, auth: dict[str, str], jobs: list[dict[str, Any]], **kw: Any) -> Any:
    return client.post("/v1/workflows", json={"name": "w", "jobs": jobs, **kw}, headers=auth)


def submitted(client: Any, auth: dict[str, str], jobs: list[dict[str, Any]]) -> dict[str, Any]:
    answer = post_workflow(client, auth, jobs)
    assert answer.status_code == 202, answer.get_json()
    body: dict[str, Any] = answer.get_json()
    return body


def by_ref(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["ref"]: job for job in workflow["jobs"]}


def read(client: Any, auth: dict[str, str], workflow_id: str) -> dict[str, Any]:
    answer = client.get(f"/v1/workflows/{workflow_id}", headers=auth)
    assert answer.status_code == 200, answer.get_json()
    body: dict[str, Any] = answer.get_json()
    return body


def run(app: Any, job: dict[str, Any] | str) -> str:
    return run_job(app.conveyor, job if isinstance(job, str) else job["id"])


def test_a_job_starts_only_after_every_dependency_succeeded(
    client: Any, auth: dict[str, str], worker_app: Any
) -> None:
    flow = submitted(
        client,
        auth,
        [
            {"ref": "a", "type": NOOP},
            {"ref": "b", "type": NOOP},
            {"ref": "c", "type": NOOP, "depends_on": ["a", "b"]},
        ],
    )
    jobs = by_ref(flow)
    assert flow["state"] == "running"
    assert flow["total"] == 3
    assert jobs["c"]["state"] == "scheduled"
    assert jobs["c"]["waiting_for"] == "dependencies"
    assert jobs["c"]["depends_on"] == ["a", "b"]
    assert run(worker_app, jobs["c"]) == "skipped"  # nothing to claim while it waits

    assert run(worker_app, jobs["a"]) == "succeeded"
    assert by_ref(read(client, auth, flow["id"]))["c"]["state"] == "scheduled"
    assert run(worker_app, jobs["b"]) == "succeeded"

    c = by_ref(read(client, auth, flow["id"]))["c"]
    assert (c["state"], c["waiting_for"]) == ("queued", None)  # the dispatcher's now
    assert run(worker_app, jobs["c"]) == "succeeded"
    done = read(client, auth, flow["id"])
    assert (done["state"], done["unfinished"], done["finished_at"] is not None) == (
        "succeeded",
        0,
        True,
    )


def test_a_dead_dependency_cancels_its_dependents_down_the_chain_unless_they_run_anyway(
    client: Any, auth: dict[str, str], worker_app: Any, sessions: sessionmaker[Session]
) -> None:
    flow = submitted(
        client,
        auth,
        [
            {"ref": "a", "type": FAIL},
            {"ref": "b", "type": NOOP, "depends_on": ["a"]},
            {"ref": "c", "type": NOOP, "depends_on": ["b"]},
            {"ref": "cleanup", "type": NOOP, "depends_on": ["a"], "on_dependency_failure": "run"},
        ],
    )
    jobs = by_ref(flow)
    assert run(worker_app, jobs["a"]) == "failed"

    after = by_ref(read(client, auth, flow["id"]))
    assert after["b"]["state"] == "cancelled"
    assert after["b"]["error"] == {
        "type": "DependencyFailed",
        "message": "dependency a ended failed",
    }
    assert after["c"]["state"] == "cancelled"
    assert after["c"]["error"]["message"] == "dependency b ended cancelled"
    assert after["cleanup"]["state"] == "queued"
    assert read(client, auth, flow["id"])["state"] == "running"
    assert run(worker_app, jobs["cleanup"]) == "succeeded"
    assert read(client, auth, flow["id"])["state"] == "failed"
    with sessions() as session:  # one abandon event each, from the platform
        moves = session.execute(
            select(JobEvent.from_state, JobEvent.to_state).where(
                JobEvent.job_id == uuid.UUID(jobs["c"]["id"])
            )
        ).all()
    assert [(str(f) if f else None, str(t)) for f, t in moves] == [
        (None, "scheduled"),
        ("scheduled", "cancelled"),
    ]


def test_retrying_the_dead_job_brings_its_cancelled_dependents_back_to_waiting(
    client: Any, auth: dict[str, str], worker_app: Any, sessions: sessionmaker[Session]
) -> None:
    flow = submitted(
        client,
        auth,
        [
            {"ref": "a", "type": FAIL},
            {"ref": "ok", "type": NOOP},
            {"ref": "b", "type": NOOP, "depends_on": ["a", "ok"]},
            {"ref": "c", "type": NOOP, "depends_on": ["b"]},
        ],
    )
    jobs = by_ref(flow)
    assert run(worker_app, jobs["ok"]) == "succeeded"
    assert run(worker_app, jobs["a"]) == "failed"
    assert read(client, auth, flow["id"])["state"] == "failed"

    retried = client.post(f"/v1/jobs/{jobs['a']['id']}/retry", headers=auth)
    assert retried.status_code == 202, retried.get_json()

    back = read(client, auth, flow["id"])
    assert back["state"] == "running"
    states = {ref: (j["state"], j["waiting_for"], j["error"]) for ref, j in by_ref(back).items()}
    assert states.pop("a")[:2] == ("queued", None)
    assert states == {
        "ok": ("succeeded", None, None),
        "b": ("scheduled", "dependencies", None),
        "c": ("scheduled", "dependencies", None),
    }
    with sessions() as session:  # b waits for a alone (ok succeeded already), c for b
        left = dict(
            session.execute(
                select(Job.workflow_ref, Job.dependencies_left).where(
                    Job.workflow_id == uuid.UUID(flow["id"])
                )
            ).all()
        )
    assert (left["b"], left["c"]) == (1, 1)


def test_unknown_refs_cycles_and_repeats_are_422s_that_name_them_and_store_nothing(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    with sessions() as session:
        before = session.scalar(select(func.count()).select_from(Job))
    unknown = post_workflow(
        client, auth, [{"ref": "a", "type": NOOP, "depends_on": ["nope", "ghost"]}]
    )
    assert_problem(unknown, 422)
    assert "nope" in unknown.get_json()["detail"]
    assert "ghost" in unknown.get_json()["detail"]
    cycle = post_workflow(
        client,
        auth,
        [
            {"ref": "a", "type": NOOP, "depends_on": ["c"]},
            {"ref": "b", "type": NOOP, "depends_on": ["a"]},
            {"ref": "c", "type": NOOP, "depends_on": ["b"]},
            {"ref": "d", "type": NOOP},
        ],
    )
    assert_problem(cycle, 422)
    assert "cycle" in cycle.get_json()["detail"]
    (error,) = cycle.get_json()["errors"]
    assert set(error["cycle"]) == {"a", "b", "c"}
    self_loop = post_workflow(client, auth, [{"ref": "a", "type": NOOP, "depends_on": ["a"]}])
    assert_problem(self_loop, 422)
    repeated = post_workflow(client, auth, [{"ref": "a", "type": NOOP}, {"ref": "a", "type": NOOP}])
    assert_problem(repeated, 422)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == before
        assert session.scalar(select(func.count()).select_from(Workflow)) == 0


def test_an_idempotency_key_answers_the_same_workflow(client: Any, auth: dict[str, str]) -> None:
    jobs = [{"ref": "a", "type": NOOP}]
    headers = {**auth, "Idempotency-Key": "wf-1"}
    first = client.post("/v1/workflows", json={"name": "w", "jobs": jobs}, headers=headers)
    again = client.post("/v1/workflows", json={"name": "w", "jobs": jobs}, headers=headers)
    other = client.post("/v1/workflows", json={"name": "x", "jobs": jobs}, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert_problem(other, 409)


def test_workflows_list_newest_first_by_pages_filtered_by_state_and_name(
    client: Any, auth: dict[str, str], worker_app: Any
) -> None:
    made = []
    for n in range(3):
        body = {"name": f"nightly-{n % 2}", "jobs": [{"ref": "a", "type": NOOP}]}
        made.append(client.post("/v1/workflows", json=body, headers=auth).get_json())
    run(worker_app, made[0]["jobs"][0])
    first = client.get("/v1/workflows?limit=2", headers=auth).get_json()
    assert [w["id"] for w in first["items"]] == [made[2]["id"], made[1]["id"]]
    rest = client.get(first["links"]["next"], headers=auth).get_json()
    assert [w["id"] for w in rest["items"]] == [made[0]["id"]]
    assert rest["next_cursor"] is None
    done = client.get("/v1/workflows?state=succeeded", headers=auth).get_json()["items"]
    assert [w["id"] for w in done] == [made[0]["id"]]
    named = client.get("/v1/workflows?name=nightly-0", headers=auth).get_json()["items"]
    assert {w["id"] for w in named} == {made[0]["id"], made[2]["id"]}
    assert_problem(client.get("/v1/workflows?state=nope", headers=auth), 422)


def test_cancelling_a_workflow_cancels_every_unfinished_job(
    client: Any, auth: dict[str, str], worker_app: Any
) -> None:
    flow = submitted(
        client,
        auth,
        [
            {"ref": "a", "type": NOOP},
            {"ref": "b", "type": NOOP, "delay_seconds": 3600},
            {"ref": "c", "type": NOOP, "depends_on": ["a", "b"]},
        ],
    )
    assert run(worker_app, by_ref(flow)["a"]) == "succeeded"
    answer = client.post(f"/v1/workflows/{flow['id']}/cancel", headers=auth)
    assert answer.status_code == 202, answer.get_json()
    body = answer.get_json()
    assert body["state"] == "cancelled"
    assert {ref: j["state"] for ref, j in by_ref(body).items()} == {
        "a": "succeeded",
        "b": "cancelled",
        "c": "cancelled",
    }
    assert_problem(client.post(f"/v1/workflows/{flow['id']}/cancel", headers=auth), 409)


def test_depends_on_in_a_plain_submit_waits_for_the_tenants_jobs(
    client: Any, auth: dict[str, str], worker_app: Any
) -> None:
    parent = client.post("/v1/jobs", json={"type": NOOP}, headers=auth).get_json()
    child = client.post(
        "/v1/jobs", json={"type": NOOP, "depends_on": [parent["id"]]}, headers=auth
    ).get_json()
    assert (child["state"], child["waiting_for"]) == ("scheduled", "dependencies")
    missing = str(uuid.uuid4())
    unknown = client.post("/v1/jobs", json={"type": NOOP, "depends_on": [missing]}, headers=auth)
    assert_problem(unknown, 422)
    assert missing in unknown.get_json()["detail"]

    assert run(worker_app, parent) == "succeeded"
    assert client.get(f"/v1/jobs/{child['id']}", headers=auth).get_json()["state"] == "queued"
    # A dependency that already succeeded is not waited for; a dead one is refused.
    now = client.post("/v1/jobs", json={"type": NOOP, "depends_on": [parent["id"]]}, headers=auth)
    assert now.get_json()["state"] == "queued"
    dead = client.post("/v1/jobs", json={"type": FAIL}, headers=auth).get_json()
    run(worker_app, dead)
    refused = client.post("/v1/jobs", json={"type": NOOP, "depends_on": [dead["id"]]}, headers=auth)
    assert_problem(refused, 409)
    anyway = client.post(
        "/v1/jobs",
        json={"type": NOOP, "depends_on": [dead["id"]], "on_dependency_failure": "run"},
        headers=auth,
    )
    assert anyway.get_json()["state"] == "queued"


def test_a_thousand_job_fan_in_fires_once_after_the_last_parent(
    client: Any, auth: dict[str, str], worker_app: Any, sessions: sessionmaker[Session]
) -> None:
    parents = [{"ref": f"p{n}", "type": NOOP} for n in range(999)]
    fan_in = {"ref": "fan-in", "type": NOOP, "depends_on": [p["ref"] for p in parents]}
    started = time.monotonic()
    flow = submitted(client, auth, [*parents, fan_in])
    assert time.monotonic() - started < 10
    jobs = by_ref(flow)
    assert jobs["fan-in"]["waiting_for"] == "dependencies"
    for parent in parents[:-1]:
        assert run(worker_app, jobs[parent["ref"]]) == "succeeded"
    with sessions() as session:
        fan = session.get_one(Job, uuid.UUID(jobs["fan-in"]["id"]))
        assert (fan.state, fan.dependencies_left) == ("scheduled", 1)
    assert run(worker_app, jobs["p998"]) == "succeeded"
    assert run(worker_app, jobs["fan-in"]) == "succeeded"
    assert run(worker_app, jobs["fan-in"]) == "skipped"
    done = read(client, auth, flow["id"])
    assert (done["state"], done["total"], done["unfinished"]) == ("succeeded", 1000, 0)
    with sessions() as session:
        promoted = session.scalar(
            select(func.count()).where(
                JobEvent.job_id == uuid.UUID(jobs["fan-in"]["id"]), JobEvent.to_state == "queued"
            )
        )
    assert promoted == 1


# --- A job's context: its dependencies' results, and jobs it adds (fan-out) -------------


class Rows(BaseModel):
    """How many chunks to split into, or the chunk to count."""

    chunks: int = 0
    rows: int = 0


TYPES = JobRegistry()


@TYPES.job_type("tests.split", payload=Rows)
def split(ctx: JobContext, payload: Rows) -> dict[str, Any]:
    """Fan out one chunk job per chunk, then a fan-in that sums them."""
    refs = [f"chunk-{n}" for n in range(payload.chunks)]
    ctx.add_jobs(
        *(
            {"ref": ref, "type": "tests.chunk", "payload": {"rows": 10 + n}}
            for n, ref in enumerate(refs)
        ),
        {"ref": "sum", "type": "tests.sum", "depends_on": [*refs, "parent"]},
    )
    if payload.rows < 0:
        raise ValueError("the split failed after adding its jobs")
    return {"split": payload.chunks}


@TYPES.job_type("tests.chunk", payload=Rows)
def chunk(ctx: JobContext, payload: Rows) -> dict[str, Any]:
    """Count a chunk's rows."""
    return {"imported": payload.rows}


@TYPES.job_type("tests.sum", payload=Rows)
def total(ctx: JobContext, payload: Rows) -> dict[str, Any]:
    """Sum the chunks' results, read from the context by ref."""
    seen = ctx.dependencies
    chunks = {ref: dep for ref, dep in seen.items() if ref.startswith("chunk-")}
    return {
        "imported": sum(dep["result"]["imported"] for dep in chunks.values()),
        "parent": [dep["result"] for ref, dep in seen.items() if ref not in chunks],
        "states": sorted({dep["state"] for dep in seen.values()}),
    }


@pytest.fixture
def typed_app(worker_app: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(worker_app.conveyor, "registry", TYPES)
    return worker_app


def _submit(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, jobs: list[dict[str, Any]]
) -> uuid.UUID:
    with sessions.begin() as session:
        return create_workflow(
            UnitOfWork.around(session),
            TYPES,
            WorkflowRequest(name="split", jobs=jobs),  # type: ignore[arg-type]
            tenant_id=tenant_id,
            default_queue="default",
            now=datetime.now(UTC),
        )


def _jobs(sessions: sessionmaker[Session], workflow_id: uuid.UUID) -> dict[str, Job]:
    with sessions() as session:
        found = session.scalars(select(Job).where(Job.workflow_id == workflow_id))
        return {str(job.workflow_ref): job for job in found}


def test_a_running_job_fans_out_and_its_fan_in_sees_every_result_by_ref(
    typed_app: Any, sessions: sessionmaker[Session], identity: Identity
) -> None:
    workflow_id = _submit(
        sessions,
        identity.tenant.id,
        [{"ref": "split", "type": "tests.split", "payload": {"chunks": 3}}],
    )
    split_job = _jobs(sessions, workflow_id)["split"]
    assert run(typed_app, str(split_job.id)) == "succeeded"

    jobs = _jobs(sessions, workflow_id)
    assert sorted(jobs) == ["chunk-0", "chunk-1", "chunk-2", "split", "sum"]
    assert jobs["sum"].waiting_for == "dependencies"
    assert jobs["sum"].dependencies_left == 3
    for n in range(3):
        assert run(typed_app, str(jobs[f"chunk-{n}"].id)) == "succeeded"
    assert run(typed_app, str(jobs["sum"].id)) == "succeeded"
    assert _jobs(sessions, workflow_id)["sum"].result == {
        "imported": 33,
        "parent": [{"split": 3}],
        "states": ["succeeded"],
    }
    with sessions() as session:
        workflow = session.get_one(Workflow, workflow_id)
        assert (workflow.state, workflow.total, workflow.unfinished) == ("succeeded", 5, 0)


def test_a_plain_job_that_fans_out_gets_a_workflow_and_a_failed_one_adds_nothing(
    typed_app: Any, sessions: sessionmaker[Session], identity: Identity
) -> None:
    with sessions.begin() as session:
        failing = job_factory(
            session, identity.tenant.id, "tests.split", {"chunks": 2, "rows": -1}, registry=TYPES
        )
        plain = job_factory(
            session, identity.tenant.id, "tests.split", {"chunks": 2}, registry=TYPES
        )
    with sessions() as session:
        jobs_before = session.scalar(select(func.count()).select_from(Job))
    assert run(typed_app, str(failing.id)) == "failed"
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == jobs_before
        assert session.scalar(select(func.count()).select_from(Workflow)) == 0

    assert run(typed_app, str(plain.id)) == "succeeded"
    with sessions() as session:
        parent = session.get_one(Job, plain.id)
        assert parent.workflow_ref == "parent"
        assert parent.workflow_id is not None
        workflow_id = parent.workflow_id
    jobs = _jobs(sessions, workflow_id)
    assert sorted(jobs) == ["chunk-0", "chunk-1", "parent", "sum"]
    for ref in ("chunk-0", "chunk-1", "sum"):
        assert run(typed_app, str(jobs[ref].id)) == "succeeded"
    assert _jobs(sessions, workflow_id)["sum"].result["imported"] == 21


def test_a_workflows_end_is_delivered_to_the_webhooks_listening_once(
    client: Any, auth: dict[str, str], worker_app: Any, sessions: sessionmaker[Session]
) -> None:
    hook = {"url": "https://hooks.example.com/wf", "events": ["workflow.succeeded"]}
    assert client.post("/v1/webhooks", json=hook, headers=auth).status_code == 201
    flow = submitted(
        client, auth, [{"ref": "a", "type": NOOP}, {"ref": "b", "type": NOOP, "depends_on": ["a"]}]
    )
    jobs = by_ref(flow)

    def deliveries() -> list[dict[str, Any]]:
        with sessions() as session:
            return [
                dict(payload)
                for payload in session.scalars(
                    select(Job.payload).where(Job.type == "webhooks.deliver")
                )
            ]

    assert run(worker_app, jobs["a"]) == "succeeded"
    assert [d for d in deliveries() if "workflow_id" in d] == []
    assert run(worker_app, jobs["b"]) == "succeeded"
    (delivery,) = [d for d in deliveries() if "workflow_id" in d]
    assert delivery["workflow_id"] == flow["id"]
    assert delivery["event"] == "workflow.succeeded"


def test_roles_are_as_for_jobs(client: Any, role_tokens: dict[str, str]) -> None:
    jobs = [{"ref": "a", "type": NOOP, "delay_seconds": 3600}]
    made = {}
    for role, token in role_tokens.items():
        answer = client.post(
            "/v1/workflows", json={"name": role, "jobs": jobs}, headers=bearer(token)
        )
        made[role] = answer.status_code
    assert made == {"admin": 202, "operator": 202, "member": 202, "viewer": 403}
    flow = client.post(
        "/v1/workflows", json={"name": "x", "jobs": jobs}, headers=bearer(role_tokens["member"])
    ).get_json()
    for role in ("viewer", "member"):
        headers = bearer(role_tokens[role])
        assert client.get(f"/v1/workflows/{flow['id']}", headers=headers).status_code == 200
        assert client.get("/v1/workflows", headers=headers).status_code == 200
        cancel = client.post(f"/v1/workflows/{flow['id']}/cancel", headers=headers)
        assert_problem(cancel, 403)
    cancel = client.post(
        f"/v1/workflows/{flow['id']}/cancel", headers=bearer(role_tokens["operator"])
    )
    assert cancel.status_code == 202
    assert_problem(
        client.get(f"/v1/workflows/{uuid.uuid4()}", headers=bearer(role_tokens["admin"])), 404
    )


@contextmanager
def statements(engine: Any) -> Iterator[list[str]]:
    """Record the statements this thread sends to PostgreSQL for the block.

    This thread's only: a heartbeat thread, or another test's leftover thread on a shared
    pool, is not the work being counted.
    """
    seen: list[str] = []
    owner = threading.get_ident()

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if threading.get_ident() == owner:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.mark.parametrize("width", [1, 999])
def test_a_finish_settles_any_number_of_dependents_in_the_same_statements(
    client: Any, auth: dict[str, str], worker_app: Any, width: int
) -> None:
    """Fan-out and fan-in alike: the parent's finish costs the same statements for 1 or 999."""
    children = [{"ref": f"c{n}", "type": NOOP, "depends_on": ["p"]} for n in range(width)]
    flow = submitted(client, auth, [{"ref": "p", "type": NOOP}, *children])
    with statements(worker_app.conveyor.engine) as seen:
        assert run(worker_app, by_ref(flow)["p"]) == "succeeded"
    # claim; succeed; count the dependents down; queue those at zero; wake the dispatcher;
    # count the workflow down (BEGIN/COMMIT are not statements).
    assert len(seen) == 6, seen
    after = by_ref(read(client, auth, flow["id"]))
    assert {after[f"c{n}"]["state"] for n in range(width)} == {"queued"}


def test_a_cancelled_or_delayed_dependent_follows_the_same_rules(
    client: Any, auth: dict[str, str], worker_app: Any
) -> None:
    flow = submitted(
        client,
        auth,
        [
            {"ref": "a", "type": NOOP},
            {"ref": "b", "type": NOOP, "depends_on": ["a"]},
            {"ref": "c", "type": NOOP, "depends_on": ["b"]},
            {"ref": "later", "type": NOOP, "depends_on": ["a"], "delay_seconds": 3600},
        ],
    )
    jobs = by_ref(flow)
    assert jobs["later"]["waiting_for"] == "dependencies"
    # A person cancels b while it waits: c, which needed it, is cancelled with it.
    assert client.post(f"/v1/jobs/{jobs['b']['id']}/cancel", headers=auth).status_code == 200
    after = by_ref(read(client, auth, flow["id"]))
    assert after["c"]["state"] == "cancelled"
    assert after["c"]["error"]["message"] == "dependency b ended cancelled"
    # a's success releases `later` to its own run time, not to the queue.
    assert run(worker_app, jobs["a"]) == "succeeded"
    later = by_ref(read(client, auth, flow["id"]))["later"]
    assert (later["state"], later["waiting_for"]) == ("scheduled", "schedule")
