"""CPU time per operation, per process group, from psutil's cpu_times deltas over a phase.

A phase's rate alone cannot tell a stack that spends more CPU per request from one that
waits more (on a lock, a round trip, a busy machine). The CPU per operation of each group
(api, worker parent, worker children, beat, PostgreSQL, Redis) can: a latency-bound phase
shows low CPU per operation and idle cores, and the figure holds up on a busy machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import psutil

GROUPS = ("api", "worker_parent", "worker_children", "beat", "postgres", "redis")

# A group's processes: the root pids to follow, and whether their children count too.
Roots = Callable[[], list[tuple[int, bool]]]


def listening_pid(port: int) -> int | None:
    """Return the pid of the process listening on 127.0.0.1:`port`, if this user can see it."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    return None


def _cpu_by_pid(roots: list[tuple[int, bool]]) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid, with_children in roots:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)] if with_children else [proc]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    times = p.cpu_times()
                    out[p.pid] = times.user + times.system
    return out


class CpuMeter:
    """Snapshots of CPU seconds per group; a delta over a phase divided by its operations."""

    def __init__(self, groups: Mapping[str, Roots]) -> None:
        self.groups = dict(groups)

    def snapshot(self) -> dict[str, dict[int, float]]:
        """Return every group's CPU seconds per pid, now."""
        return {name: _cpu_by_pid(roots()) for name, roots in self.groups.items()}

    @staticmethod
    def per_op(
        before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], ops: float
    ) -> dict[str, float]:
        """Return CPU milliseconds per operation per group between two snapshots.

        A process that started meanwhile counts from zero; one that ended is lost (its
        time went with it), which is why a phase snapshots once its processes are up.
        """
        out = {}
        for name, now in after.items():
            then = before.get(name, {})
            seconds = sum(max(0.0, cpu - then.get(pid, 0.0)) for pid, cpu in now.items())
            out[name] = 1000 * seconds / ops if ops else 0.0
        out["total"] = sum(out.values())
        return out
