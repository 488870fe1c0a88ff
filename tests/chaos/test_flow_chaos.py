"""Flow control under faults: limits hold through kill -9, pauses through a full restart.

Same cluster and verdicts as `test_chaos.py`; the limit's verdict is the ledger's own order of
events (`Cluster.most_running`), its slots the `limits` row.
"""

from __future__ import annotations

import random

import pytest

from tests.chaos.harness import SETTLE, Cluster, busy_children, completions, report
from tests.conftest import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


def slots_held(cluster: Cluster, key: str) -> int:
    """Return how many slots of a tenant limit the ledger counts as taken."""
    return int(cluster.sql("SELECT running FROM limits WHERE key = %s", (key,))[0][0])


def test_kill_9_workers_while_limited_jobs_run(cluster: Cluster) -> None:
    jobs, kills, limit = 300, 4, 3
    status, _, body = cluster.request("PUT", "/v1/limits/chaos", {"max_running": limit})
    assert status == 200, body
    cluster.start_beat()
    # Four pool processes for a limit of three: only the limit keeps the fourth idle.
    workers = {name: cluster.start_worker(name) for name in ("w1", "w2")}
    rng = random.Random(17)
    ids, statuses = cluster.submit_counts(
        [f"limited-{n}" for n in range(jobs)], lambda _: rng.uniform(0.02, 0.1), limit_key="chaos"
    )
    assert statuses == {202: jobs}, statuses
    for n in range(kills):
        goal = (n + 1) * jobs // (kills + 2)
        wait_for(lambda goal=goal: completions(cluster) >= goal, timeout=120, interval=0.05)
        name = f"w{1 + n % 2}"
        if n % 2 == 0:
            victims = wait_for(
                lambda name=name: busy_children(cluster, name), timeout=30, interval=0.01
            )
            victims[0].kill()
        else:
            workers[name].kill_tree()
            workers[name] = cluster.start_worker(name)
    cluster.wait_terminal(ids, timeout=SETTLE)
    most = cluster.most_running(ids)
    held = slots_held(cluster, "chaos")
    print(f"CHAOS limited jobs: most running at once {most} (limit {limit}), slots held {held}")
    report(f"kill -9 x{kills} during {jobs} jobs limited to {limit}", cluster.outcome(ids))
    assert most <= limit
    assert held == 0  # the reaper gave back the slots of the killed runs


def test_a_paused_queue_survives_a_restart_of_every_process(cluster: Cluster) -> None:
    queue = cluster.env["CONVEYOR_DEFAULT_QUEUE"]
    status, _, body = cluster.request("POST", f"/v1/queues/{queue}/pause")
    assert status == 200, body
    cluster.start_beat()
    cluster.start_worker("w1")
    ids, statuses = cluster.submit_counts([f"paused-{n}" for n in range(20)], lambda _: 0.02)
    assert statuses == {202: 20}, statuses
    # Every process and both servers go down and come back (Redis empty: it keeps nothing).
    cluster.restart_everything()
    cluster.start_beat()
    cluster.start_worker("w1")
    # The other tenant's jobs in the same queue run, and only through the dispatcher (a limit
    # of one holds them in the ledger): once they are done, it has passed over the queue
    # several times since the restart.
    other = cluster.other_token
    status, _, body = cluster.request("PUT", "/v1/limits/one", {"max_running": 1}, token=other)
    assert status == 200, body
    canary, _ = cluster.submit_counts(
        [f"canary-{n}" for n in range(3)], lambda _: 0.02, token=other, limit_key="one"
    )
    assert cluster.wait_terminal(canary, timeout=120) == {"succeeded": 3}
    assert cluster.states(ids) == {"queued": 20}
    assert cluster.sql(
        "SELECT count(*) FROM chaos_runs WHERE job_id = ANY(%s::uuid[])", (ids,)
    ) == [(0,)]
    waiting = cluster.sql(
        "SELECT DISTINCT waiting_for FROM jobs WHERE id = ANY(%s::uuid[])", (ids,)
    )
    assert waiting == [("pause",)]
    status, _, body = cluster.request("GET", "/v1/queues")
    assert [q["paused"] for q in body["queues"] if q["name"] == queue] == [True]
    status, _, body = cluster.request("POST", f"/v1/queues/{queue}/resume")
    assert status == 200, body
    cluster.wait_terminal(ids, timeout=SETTLE)
    report("paused queue through a restart of everything", cluster.outcome(ids))
