"""How fast the console's pages answer over a big ledger, and the plans of their queries.

    .venv/bin/python -m bench.console --database-url postgresql://…/consolebench

Fills a fresh database with `--jobs` jobs of one tenant (plus a tenth as many of another)
in one `INSERT … SELECT generate_series` — bench data set straight into the table, as a
restore would, not through the ledger — then signs in through the console's form and times
each page (median of five, in-process: database, Redis and rendering, no network), and
writes the `EXPLAIN (ANALYZE, BUFFERS)` of the list queries to `--plans`.
"""

from __future__ import annotations

import argparse
import re
import secrets
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text

from conveyor.auth.identity import add_user
from conveyor.auth.roles import Role
from conveyor.db import create_db_engine, create_session_factory
from conveyor.ledger.reads import JobFilter
from conveyor.migrations import alembic_config, upgrade
from conveyor.models import Tenant
from conveyor.settings import Settings

# A fresh password per run: nothing to guess, nothing to leak.
PASSWORD = secrets.token_urlsafe(16)
# Of every 1,000 jobs: 1 failed, 2 queued, 1 running, 1 cancelled, the rest succeeded.
SEED = """
INSERT INTO jobs (id, tenant_id, type, queue, state, payload, tags, metadata, attempt,
                  max_attempts, created_at, published_at, started_at, finished_at,
                  error_type, error_message, result)
SELECT gen_random_uuid(), :tenant, 'bench.type' || (g % 5), 'bench-q' || (g % 3), s.state,
       jsonb_build_object('n', g),
       CASE WHEN g % :tag_every = 0 THEN ARRAY['t' || (g / :tag_every % 100)]
            ELSE '{}'::varchar(64)[] END,
       '{}'::jsonb,
       1, 3, c.created, c.created,
       CASE WHEN s.state IN ('queued') THEN NULL ELSE c.created + interval '1 second' END,
       CASE WHEN s.state IN ('queued', 'running') THEN NULL
            ELSE c.created + interval '2 seconds' END,
       CASE WHEN s.state = 'failed' THEN 'JobFailed' END,
       CASE WHEN s.state = 'failed' THEN 'failed on purpose' END,
       CASE WHEN s.state = 'succeeded' THEN jsonb_build_object('ok', true) END
FROM generate_series(1, :count) AS g,
     LATERAL (SELECT now() - g * (:span / :count) * interval '1 second' AS created) AS c,
     LATERAL (SELECT CASE g % 1000 WHEN 0 THEN 'failed' WHEN 1 THEN 'queued'
                                   WHEN 2 THEN 'queued' WHEN 3 THEN 'running'
                                   WHEN 4 THEN 'cancelled' ELSE 'succeeded' END AS state) AS s
"""
PAGES = (
    "/console/",
    "/console/jobs",
    "/console/jobs?state=failed",
    "/console/jobs?state=expired",
    "/console/jobs?type=bench.type3",
    "/console/jobs?queue=bench-q1",
    "/console/jobs?tag=t42",
    "/console/jobs?state=failed&type=bench.type0",
    "/console/queues",
    "/console/limits",
    "/console/schedules",
    "/console/audit",
)


def _fresh_database(url: str) -> None:
    head, _, name = url.rpartition("/")
    with psycopg.connect(f"{head}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')


def seed(settings: Settings, jobs: int, tag_every: int = 1) -> tuple[uuid.UUID, str]:
    """Create two tenants and their jobs; return the first tenant and its admin's email."""
    engine = create_db_engine(settings)
    sessions = create_session_factory(engine)
    email = f"bench-{uuid.uuid4().hex[:6]}@console.bench"
    with sessions.begin() as session:
        mine, other = Tenant(name="Bench"), Tenant(name="Other")
        session.add_all([mine, other])
        session.flush()
        add_user(session, mine.id, email, PASSWORD, Role.ADMIN)
        tenants = [(mine.id, jobs), (other.id, max(1, jobs // 10))]
    span = 30 * 24 * 3600  # a month of jobs
    with engine.begin() as conn:
        for tenant, count in tenants:
            started = time.monotonic()
            params = {"tenant": tenant, "count": count, "span": span, "tag_every": tag_every}
            conn.execute(text(SEED), params)
            print(f"seeded {count:,} jobs in {time.monotonic() - started:.1f}s", flush=True)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
    engine.dispose()
    return tenants[0][0], email


def time_pages(settings: Settings, email: str) -> list[tuple[str, float, int]]:
    """Sign in through the form and time each page: (path, median ms, status)."""
    from api import create_app

    app = create_app(settings)
    client = app.test_client()
    form = client.get("/console/sign-in").get_data(as_text=True)
    found = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert found, "the sign-in form has no CSRF token"
    data = {"email": email, "password": PASSWORD, "csrf_token": found.group(1)}
    assert client.post("/console/sign-in", data=data).status_code == 302
    timings = []
    for path in PAGES:
        client.get(path)  # warm: caches, pools, the plan cache
        samples, status = [], 0
        for _ in range(5):
            started = time.perf_counter()
            answer = client.get(path)
            samples.append((time.perf_counter() - started) * 1000)
            status = answer.status_code
        timings.append((path, statistics.median(samples), status))
    app.extensions["conveyor"].engine.dispose()
    return timings


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """Return bind values as the driver takes them (enums by value, as the column types do)."""

    def plain(value: Any) -> Any:
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value.value if isinstance(value, Enum) else value

    return {name: plain(value) for name, value in params.items()}


def explain(settings: Settings, tenant_id: uuid.UUID) -> str:
    """Return the plans of the console's job queries, as the ledger builds them."""
    from conveyor.ledger import activity, reads
    from conveyor.ledger.states import JobState
    from conveyor.queues import ledger_queue_stats

    engine = create_db_engine(settings)
    captured: list[tuple[str, tuple[str, Any]]] = []
    now = datetime.now(UTC)

    def capture(name: str, run: Any) -> None:
        with create_session_factory(engine)() as session:
            statements: list[Any] = []
            real = session.execute

            def spy(statement: Any, *args: Any, **kwargs: Any) -> Any:
                statements.append(statement)
                return real(statement, *args, **kwargs)

            session.execute = spy  # type: ignore[method-assign]
            run(session)
            for statement in statements[-1:]:
                compiled = statement.compile(
                    dialect=engine.dialect, compile_kwargs={"render_postcompile": True}
                )
                captured.append((name, (str(compiled), _plain(compiled.params))))

    filters = {
        "list, no filter": JobFilter(),
        "list, state=failed": JobFilter(state=JobState.FAILED),
        "list, state=expired (none)": JobFilter(state=JobState.EXPIRED),
        "list, type": JobFilter(type="bench.type3"),
        "list, tag": JobFilter(tag="t42"),
    }
    for name, job_filter in filters.items():
        capture(name, lambda s, f=job_filter: reads.list_jobs(s, tenant_id, f, limit=50))
    capture("finishes per minute", lambda s: activity.finishes_per_minute(s, tenant_id, now))
    capture("recent failures", lambda s: activity.recent_failures(s, tenant_id, now))
    capture("queue stats", lambda s: ledger_queue_stats(s, tenant_id))
    out = []
    with engine.connect() as conn:
        for name, (sql, params) in captured:
            explained = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params)
            rows = explained.scalars().all()
            out.append(f"-- {name}\n" + "\n".join(rows))
    engine.dispose()
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Seed, time the pages, write the plans; print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--plans", type=Path, default=Path("bench/results/console-plans.txt"))
    parser.add_argument(
        "--tag-every", type=int, default=1, help="tag one job in N (the others have no tags)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args(argv)
    _fresh_database(args.database_url)
    settings = Settings(
        database_url=args.database_url.replace("postgresql://", "postgresql+psycopg://", 1),
        rate_limits_enabled=False,
        secret_key=secrets.token_urlsafe(32),
    )
    upgrade(alembic_config(url=settings.database_url.get_secret_value()))
    tenant_id, email = seed(settings, args.jobs, args.tag_every)
    print(f"\n{'page':52} {'median ms':>10} status")
    for path, ms, status in time_pages(settings, email):
        print(f"{path:52} {ms:10.1f} {status}")
    args.plans.parent.mkdir(parents=True, exist_ok=True)
    args.plans.write_text(explain(settings, tenant_id))
    print(f"\nplans: {args.plans}")
    if not args.keep:
        head, _, name = args.database_url.rpartition("/")
        with psycopg.connect(f"{head}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
