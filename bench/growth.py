"""How Conveyor's costs grow with its ledger: finished jobs inserted fast, then pruned.

`fill` adds finished jobs with one `INSERT ... SELECT generate_series` per million rows
(two at a time, one per core), through every index, constraint and trigger the real
table has; nothing is disabled. The rows are the bench tenant's own `system.noop` jobs,
finished two days ago and one millisecond apart, so the per-tenant indexes a submit, a
poll and a claim use grow as a busy tenant's would. `prune_half` then deletes the older
half with the retention's own predicate (`finished_at` before a cut-off).

Not inserted: `job_events` rows (a real finished job has a few). The measures here read
and write `jobs`; the events table's growth is not measured.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text

FILL_AGE = timedelta(days=2)
CHUNK = 1_000_000

FILL = """
INSERT INTO jobs (id, tenant_id, type, queue, state, payload, created_at, published_at,
                  started_at, finished_at, attempt, result, version, worker)
SELECT gen_random_uuid(), :tenant, 'system.noop', :queue, 'succeeded', '{}'::jsonb,
       ts - interval '5 milliseconds', ts - interval '5 milliseconds',
       ts - interval '4 milliseconds', ts, 1, '{}'::jsonb, 3, 'bench-fill'
FROM (SELECT CAST(:base AS timestamptz) - g * interval '1 millisecond' AS ts
      FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g) AS rows
"""


class Filler:
    """Finished jobs added to one tenant's ledger, numbered so a cut-off prunes half."""

    def __init__(self, engine: Engine, tenant_id: uuid.UUID, queue: str) -> None:
        self.engine, self.tenant_id, self.queue = engine, tenant_id, queue
        self.base = datetime.now(UTC) - FILL_AGE
        self.rows = 0

    def fill_to(self, total: int) -> float:
        """Insert finished jobs until the ledger holds `total` of them; return the seconds."""
        began = time.monotonic()
        chunks = [
            (first, min(first + CHUNK - 1, total))
            for first in range(self.rows + 1, total + 1, CHUNK)
        ]
        errors: list[BaseException] = []

        def insert() -> None:
            while chunks:
                try:
                    first, last = chunks.pop(0)
                except IndexError:
                    return
                try:
                    with self.engine.begin() as conn:
                        conn.execute(
                            text(FILL),
                            {
                                "tenant": self.tenant_id,
                                "queue": self.queue,
                                "base": self.base,
                                "first": first,
                                "last": last,
                            },
                        )
                except BaseException as exc:  # re-raised in the caller's thread
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=insert) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        self.rows = max(self.rows, total)
        self._analyze()
        return time.monotonic() - began

    def prune_half(self) -> tuple[int, float]:
        """Delete the older half of the filled jobs as retention would; return rows, seconds."""
        began = time.monotonic()
        cut = self.base - timedelta(milliseconds=self.rows // 2)
        with self.engine.begin() as conn:
            deleted = conn.execute(
                text("DELETE FROM jobs WHERE finished_at < :cut"), {"cut": cut}
            ).rowcount
        self._analyze()
        return int(deleted), time.monotonic() - began

    def forget_new(self) -> None:
        """Delete the jobs the measures submitted since, keeping the filled history."""
        with self.engine.begin() as conn:
            conn.execute(
                text("DELETE FROM jobs WHERE created_at > :base"),
                {"base": self.base + timedelta(hours=1)},
            )

    def count(self) -> int:
        """Return how many jobs the ledger holds."""
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM jobs")).scalar_one())

    def _analyze(self) -> None:
        # Autovacuum analyses a table this changed within a minute or so; the measures
        # follow at once, so do now what it would do, and nothing more (no VACUUM).
        with self.engine.begin() as conn:
            conn.execute(text("ANALYZE jobs"))
