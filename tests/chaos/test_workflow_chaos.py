"""Workflows under faults: workers killed mid-workflow, then PostgreSQL restarted.

Every job is a `chaos.count`, so "ran once" is a fact in PostgreSQL (its completion row is
written in the job's own transaction). The order is the ledger's: a child's start event must
come after every parent's success event, and each fan-in completes exactly once.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.chaos.harness import SETTLE, Cluster, busy_children, completions, report
from tests.conftest import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]
WORKFLOWS, WIDTH = 4, 20


def _workflow(n: int, rng: random.Random) -> dict[str, object]:
    """Split, WIDTH chunks, a fan-in after them all, and a report after the fan-in."""

    def job(ref: str, *after: str) -> dict[str, object]:
        payload = {"key": f"wf{n}-{ref}", "seconds": rng.uniform(0.05, 0.25)}
        return {"ref": ref, "type": "chaos.count", "payload": payload, "depends_on": list(after)}

    chunks = [f"chunk-{c}" for c in range(WIDTH)]
    return {
        "name": f"chaos-{n}",
        "jobs": [
            job("split"),
            *(job(chunk, "split") for chunk in chunks),
            job("fan-in", *chunks),
            job("report", "fan-in"),
        ],
    }


def test_workers_killed_and_postgres_restarted_mid_workflow(cluster: Cluster) -> None:
    rng = random.Random(18)
    cluster.start_beat()
    workers = {name: cluster.start_worker(name) for name in ("w1", "w2")}
    flows = []
    for n in range(WORKFLOWS):
        status, _, body = cluster.request("POST", "/v1/workflows", _workflow(n, rng))
        assert status == 202, body
        flows.append(body)
    ids = [job["id"] for flow in flows for job in flow["jobs"]]
    total = len(ids)
    # A pool process killed while it runs a job, then a whole worker, then PostgreSQL.
    wait_for(lambda: completions(cluster) >= total // 5, timeout=120, interval=0.05)
    victims = wait_for(lambda: busy_children(cluster, "w1"), timeout=30, interval=0.01)
    victims[0].kill()
    wait_for(lambda: completions(cluster) >= 2 * total // 5, timeout=120, interval=0.05)
    workers["w2"].kill_tree()
    workers["w2"] = cluster.start_worker("w2")
    wait_for(lambda: completions(cluster) >= 3 * total // 5, timeout=120, interval=0.05)
    cluster.restart_postgres(lambda: time.sleep(2))

    cluster.wait_terminal(ids, timeout=SETTLE)
    report(f"workers killed, PostgreSQL restarted, {WORKFLOWS} workflows", cluster.outcome(ids))
    early = cluster.sql(
        """
        SELECT count(*) FROM job_dependencies d
        JOIN job_events child ON child.job_id = d.job_id AND child.to_state = 'running'
        JOIN job_events parent ON parent.job_id = d.depends_on_id
             AND parent.to_state = 'succeeded'
        WHERE d.job_id = ANY(%s::uuid[]) AND child.id < parent.id
        """,
        (ids,),
    )[0][0]
    fan_ins = cluster.sql(
        "SELECT completions FROM chaos_completions WHERE key LIKE %s ORDER BY key", ("%-fan-in",)
    )
    states = cluster.sql(
        "SELECT state, count(*) FROM workflows WHERE id = ANY(%s::uuid[]) GROUP BY state",
        ([flow["id"] for flow in flows],),
    )
    print(f"CHAOS workflows: children started before a parent {early}, fan-ins {fan_ins}")
    assert early == 0
    assert fan_ins == [(1,)] * WORKFLOWS
    assert states == [("succeeded", WORKFLOWS)]
