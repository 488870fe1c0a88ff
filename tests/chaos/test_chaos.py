"""Kill it, restart it, flood it: an accepted job is never lost and never succeeds twice.

Each scenario drives `chaos.count` jobs through real processes, breaks something, and reads
the verdict from PostgreSQL. Every scenario prints one line:
`CHAOS <name>: accepted N, succeeded N, lost N, duplicated N`.
"""

from __future__ import annotations

import itertools
import random
import signal
import threading
import uuid

import pytest

from tests.chaos.harness import SETTLE, Cluster, busy_children, completions, report
from tests.conftest import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


def test_kill_9_workers_during_a_thousand_short_jobs(cluster: Cluster) -> None:
    jobs, kills = 1000, 5
    cluster.start_beat()
    workers = {name: cluster.start_worker(name) for name in ("w1", "w2")}
    keys = [f"k9-{n}" for n in range(jobs)]
    rng = random.Random(9)
    result: dict[str, object] = {}

    def submit() -> None:
        result["ids"], result["statuses"] = cluster.submit_counts(
            keys, lambda _: rng.uniform(0, 0.2)
        )

    submitter = threading.Thread(target=submit)
    submitter.start()
    for n in range(kills):
        goal = (n + 1) * jobs // (kills + 2)
        wait_for(lambda goal=goal: completions(cluster) >= goal, timeout=120, interval=0.05)
        name = f"w{1 + n % 2}"
        if n % 2 == 0:
            # The OOM killer's way: one pool process dies mid-job; its worker lives on.
            victims = wait_for(
                lambda name=name: busy_children(cluster, name), timeout=30, interval=0.01
            )
            victims[0].kill()
        else:
            # A host lost: the worker and its pool die at once; a new one takes its place.
            workers[name].kill_tree()
            workers[name] = cluster.start_worker(name)
    submitter.join(timeout=300)
    ids: list[str] = result["ids"]  # type: ignore[assignment]
    statuses = result["statuses"]
    assert set(statuses) <= {202}, statuses  # type: ignore[arg-type]
    cluster.wait_terminal(ids, timeout=SETTLE)
    report(f"kill -9 x{kills} during {jobs} jobs", cluster.outcome(ids))


def test_sigterm_a_worker_mid_job(cluster: Cluster) -> None:
    cluster.start_beat()
    worker = cluster.start_worker("w1", concurrency=1)
    status, _, job = cluster.submit("chaos.count", {"key": "term-1", "seconds": 3})
    assert status == 202
    wait_for(lambda: busy_children(cluster, "w1"), timeout=30, interval=0.02)
    worker.popen.send_signal(signal.SIGTERM)
    # Warm shutdown: the running job finishes before the worker exits.
    assert worker.popen.wait(timeout=60) == 0
    standby = cluster.start_worker("w2", concurrency=1)
    ids = [job["id"]]
    # Jobs submitted after the shutdown go to the next worker.
    later, _ = cluster.submit_counts([f"term-{n}" for n in range(2, 12)], lambda _: 0.05)
    ids += later
    cluster.wait_terminal(ids, timeout=SETTLE)
    assert standby.popen.poll() is None
    report("SIGTERM mid-job", cluster.outcome(ids))


def test_duplicate_delivery_runs_once(cluster: Cluster) -> None:
    from celery import Celery

    from conveyor.broker.publisher import CeleryPublisher, Message

    cluster.start_worker("w1", concurrency=2)
    cluster.start_worker("w2", concurrency=2)
    # Stored but never published: no beat runs, so only our three publishes exist.
    ids = []
    for n in range(20):
        status, _, job = cluster.submit("chaos.count", {"key": f"dup-{n}", "seconds": 0.2})
        assert status == 202
        ids.append(job["id"])
    app = Celery("chaos-dup", broker=cluster.env["CONVEYOR_REDIS_URL"], set_as_current=False)
    app.conf.broker_transport_options = broker_options(cluster)
    publisher = CeleryPublisher(app)
    queue = cluster.env["CONVEYOR_DEFAULT_QUEUE"]
    for _ in range(3):
        publisher.publish(Message(uuid.UUID(i), "chaos.count", queue) for i in ids)
    cluster.wait_terminal(ids, timeout=SETTLE)
    runs = cluster.sql("SELECT count(*) FROM chaos_runs WHERE job_id = ANY(%s::uuid[])", (ids,))
    app.close()
    assert runs[0][0] == len(ids)
    report("duplicate delivery x3", cluster.outcome(ids))


class Flood:
    """Submits `chaos.count` jobs from a few threads until told to stop (or `limit` is reached).

    Each answer is filed under the phase the test declared when it arrived, so "what did the API
    say while Redis was down" is a fact of the run.
    """

    def __init__(self, cluster: Cluster, prefix: str, limit: int, threads: int = 6) -> None:
        self.cluster, self.prefix, self.limit = cluster, prefix, limit
        self.phase = "before"
        self.answers: list[tuple[str, int, dict[str, str], object]] = []
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> Flood:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                n, self._next = self._next, self._next + 1
            if n >= self.limit:
                return
            phase = self.phase
            try:
                status, headers, body = self.cluster.submit(
                    "chaos.count", {"key": f"{self.prefix}-{n}", "seconds": 0.02}
                )
            except OSError as exc:  # no answer at all: counted, never accepted
                status, headers, body = -1, {}, repr(exc)
            with self._lock:
                self.answers.append(
                    (phase if phase == self.phase else "edge", status, headers, body)
                )

    def count(self, phase: str) -> int:
        with self._lock:
            return sum(1 for p, *_ in self.answers if p == phase)

    def accepted(self) -> list[str]:
        with self._lock:
            return [b["id"] for _, s, _, b in self.answers if s in (200, 202)]  # type: ignore[index]

    def statuses(self, phase: str) -> dict[int, int]:
        out: dict[int, int] = {}
        with self._lock:
            for p, status, _, _ in self.answers:
                if p == phase:
                    out[status] = out.get(status, 0) + 1
        return out


def test_redis_killed_and_restarted_during_a_submit_flood(cluster: Cluster) -> None:
    cluster.start_beat()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    with Flood(cluster, "redis", limit=3000) as flood:
        wait_for(lambda: flood.count("before") >= 150, timeout=120, interval=0.05)
        flood.phase = "down"
        # No persistence: queued messages, unacked messages and results all vanish with it.
        cluster.stop_redis()
        wait_for(lambda: flood.count("down") >= 50, timeout=120, interval=0.05)
        cluster.start_redis()
        flood.phase = "after"
        wait_for(lambda: flood.count("after") >= 150, timeout=120, interval=0.05)
    for phase in ("before", "down", "edge", "after"):
        print(f"CHAOS redis outage: answers {phase}: {flood.statuses(phase)}")
    # The ledger is the source of truth: with the broker gone the API still accepts durably.
    assert set(flood.statuses("down")) == {202}, flood.statuses("down")
    assert all(s in (202, 503) for p in ("before", "edge", "after") for s in flood.statuses(p))
    ids = flood.accepted()
    cluster.wait_terminal(ids, timeout=SETTLE)
    report("Redis killed and restarted during a submit flood", cluster.outcome(ids))


def test_postgres_restarted_during_a_run(cluster: Cluster) -> None:
    cluster.start_beat()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    down: dict[int, int] = {}

    def while_down() -> None:
        for _ in range(20):
            status, headers, body = cluster.submit("chaos.count", {"key": "never", "seconds": 0})
            down[status] = down.get(status, 0) + 1
            assert status == 503, (status, body)
            assert headers["Content-Type"] == "application/problem+json"
            assert headers.get("Retry-After")
        ready, _, _ = cluster.request("GET", "/readyz")
        assert ready == 503

    with Flood(cluster, "pg", limit=100_000, threads=4) as flood:
        wait_for(lambda: flood.count("before") >= 200, timeout=120, interval=0.05)
        flood.phase = "down"
        cluster.restart_postgres(while_down)
        flood.phase = "after"
        # Recovers by itself: the same API processes accept jobs again.
        wait_for(lambda: flood.statuses("after").get(202, 0) >= 200, timeout=120, interval=0.05)
    for phase in ("before", "down", "edge", "after"):
        print(f"CHAOS postgres restart: answers {phase}: {flood.statuses(phase)}")
    print(f"CHAOS postgres restart: probes while down: {down}")
    answers = {s for p in ("before", "down", "edge", "after") for s in flood.statuses(p)}
    assert answers <= {202, 503}, answers
    ids = flood.accepted()
    cluster.wait_terminal(ids, timeout=SETTLE)
    report("PostgreSQL restarted during a run", cluster.outcome(ids))


def test_two_beats_leader_killed_mid_run(cluster: Cluster) -> None:
    cluster.start_worker("w1")
    status, _, schedule = cluster.request(
        "POST",
        "/v1/schedules",
        {"name": "every second", "job_type": "chaos.count", "interval_seconds": 1},
    )
    assert status == 201, schedule

    def fired() -> list[tuple[str, object]]:
        return cluster.sql(
            "SELECT id::text, schedule_occurrence FROM jobs WHERE schedule_id = %s "
            "ORDER BY schedule_occurrence",
            (schedule["id"],),
        )

    beats = [cluster.start_beat("beat-a"), cluster.start_beat("beat-b")]
    wait_for(lambda: len(fired()) >= 5, timeout=60)
    leaders = [b for b in beats if "this beat leads housekeeping" in b.log.read_text()]
    assert len(leaders) == 1, [b.name for b in leaders]
    before = len(fired())
    leaders[0].kill_tree()
    wait_for(lambda: len(fired()) >= before + 5, timeout=60)
    # The old leader comes back as a follower; the survivor keeps the lead.
    beats.append(cluster.start_beat("beat-a2"))
    again = len(fired())
    wait_for(lambda: len(fired()) >= again + 5, timeout=60)
    status, _, _ = cluster.request("PATCH", f"/v1/schedules/{schedule['id']}", {"enabled": False})
    assert status == 200
    rows = fired()
    ids = [job_id for job_id, _ in rows]
    occurrences = [when for _, when in rows]
    cluster.wait_terminal(ids, timeout=SETTLE)
    gaps = [
        (a, b)
        for a, b in itertools.pairwise(occurrences)
        if (b - a).total_seconds() != 1  # type: ignore[operator]
    ]
    print(f"CHAOS two beats: {len(rows)} occurrences, gaps {gaps}")
    outcome = cluster.outcome(ids)
    outcome.duplicated += len(occurrences) - len(set(occurrences))
    outcome.lost += len(gaps)
    report("two beats, leader killed mid-run", outcome)


def test_poison_jobs_fail_cleanly_and_the_worker_keeps_serving(cluster: Cluster) -> None:
    cluster.start_beat()
    worker = cluster.start_worker("w1")
    poisons = {}
    for mode in ("raise", "exit"):
        status, _, job = cluster.submit("chaos.poison", {"mode": mode})
        assert status == 202
        poisons[mode] = job["id"]
    # A payload that no longer matches its model (a deploy changed the type): stored valid,
    # made invalid in the ledger before it runs.
    status, _, job = cluster.request(
        "POST", "/v1/jobs", {"type": "chaos.count", "payload": {}, "delay_seconds": 3600}
    )
    assert status == 202
    cluster.execute(
        'UPDATE jobs SET payload = \'{"seconds": "soon"}\', scheduled_for = now() WHERE id = %s',
        (job["id"],),
    )
    poisons["bad payload"] = job["id"]
    ids, statuses = cluster.submit_counts([f"after-poison-{n}" for n in range(30)], lambda _: 0.05)
    assert statuses == {202: 30}
    cluster.wait_terminal([*ids, *poisons.values()], timeout=SETTLE)
    for mode, job_id in poisons.items():
        _, _, body = cluster.request("GET", f"/v1/jobs/{job_id}")
        print(f"CHAOS poison {mode}: {body['state']} {body['error']}")
        assert body["state"] == "failed", body
        assert body["error"]["type"], body
        assert body["error"]["message"], body
    assert worker.popen.poll() is None
    report("poison jobs beside 30 good ones", cluster.outcome(ids))


def broker_options(cluster: Cluster) -> dict[str, object]:
    """Return the transport options Conveyor's processes use (priority lists, separator)."""
    from conveyor.broker.config import create_celery
    from conveyor.settings import Settings

    settings = Settings(
        redis_url=cluster.env["CONVEYOR_REDIS_URL"], secret_key=cluster.env["CONVEYOR_SECRET_KEY"]
    )
    app = create_celery(settings, name="chaos-probe")
    return dict(app.conf.broker_transport_options)


def test_redelivery_past_the_visibility_timeout_never_runs_a_job_twice(cluster: Cluster) -> None:
    from kombu import Connection

    from conveyor.broker.internals import restore_overdue_unacked

    first = cluster.start_worker("w1", concurrency=1)
    # Long enough to outlast the second worker's start on a loaded 2-core machine (8 s did
    # not: w2 was ready only after the job had finished, leaving nothing to redeliver).
    status, _, job = cluster.submit("chaos.count", {"key": "slow", "seconds": 25})
    assert status == 202
    wait_for(lambda: busy_children(cluster, "w1"), timeout=30, interval=0.02)
    cluster.start_worker("w2", concurrency=1)
    assert busy_children(cluster, "w1"), "the job ended before the second worker was up"
    # What Redis does when a job outruns the visibility timeout: the unacked message goes
    # back to its queue while the first worker still runs it. Done here with a zero timeout
    # instead of waiting an hour.
    url = cluster.env["CONVEYOR_REDIS_URL"]
    options = {**broker_options(cluster), "visibility_timeout": 0}
    with Connection(url, transport_options=options) as conn:
        restore_overdue_unacked(conn)
    wait_for(
        lambda: "is not queued; skipping this delivery" in cluster.procs[-1].log.read_text(),
        timeout=60,
    )
    ids = [job["id"]]
    cluster.wait_terminal(ids, timeout=SETTLE)
    assert first.popen.poll() is None
    runs = cluster.sql("SELECT count(*) FROM chaos_runs WHERE job_id = %s", (job["id"],))
    assert runs[0][0] == 1
    report("redelivered past the visibility timeout while running", cluster.outcome(ids))


ORPHAN = """
import json, os, sys
from kombu import Connection
url, queue, options, count = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
with Connection(url, transport_options=options) as conn:
    channel = conn.channel()
    taken = 0
    while taken < count:
        if channel.basic_get(queue, no_ack=False) is not None:
            taken += 1
    print("took", taken, flush=True)
    os._exit(0)  # dies holding them unacked: no restore at shutdown, no claim
"""


def test_a_worker_killed_between_receiving_and_claiming(cluster: Cluster) -> None:
    import json
    import subprocess
    import sys

    # Nobody consumes yet: the messages wait in the queue.
    ids, statuses = cluster.submit_counts([f"orphan-{n}" for n in range(5)], lambda _: 0.05)
    assert statuses == {202: 5}
    # A consumer receives them and dies before it claims any: kombu keeps them in its unacked
    # hash, where Redis gives them back only after the visibility timeout (hours).
    queue = cluster.env["CONVEYOR_DEFAULT_QUEUE"]
    argv = [sys.executable, "-c", ORPHAN, cluster.env["CONVEYOR_REDIS_URL"], queue]
    done = subprocess.run(
        [*argv, json.dumps(broker_options(cluster)), "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "took 5" in done.stdout
    cluster.start_beat()
    cluster.start_worker("w1")
    cluster.wait_terminal(ids, timeout=120)
    report("worker killed between receiving and claiming", cluster.outcome(ids))
