"""The index diet on `jobs` (migration 0018): the queries still reach the slimmer indexes.

`ix_jobs_tags` holds only tagged jobs and `ix_jobs_tenant_finished` only finished ones;
a query reaches a partial index only when the planner can prove its predicate, so these
check the plans of the queries as the code builds them (sequential scans off, so a tiny
test table does not hide the choice).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from conveyor.ledger.reads import JobFilter
from conveyor.models import Job
from conveyor.quota import count_unfinished, drain_rate


def plan(session: Session, statement: Any, params: dict[str, Any] | None = None) -> str:
    """Return the plan of `statement` (SQL text or a SQLAlchemy statement), seq scans off."""
    session.execute(select(1))  # the savepoint's connection exists before SET LOCAL
    connection = session.connection()
    connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
    if not isinstance(statement, str):
        compiled = statement.compile(dialect=connection.dialect)
        statement, params = str(compiled), compiled.params
    rows = connection.exec_driver_sql(f"EXPLAIN {statement}", params or {}).scalars().all()
    return "\n".join(rows)


def captured(session: Session, run: Any) -> tuple[str, Any]:
    """Run `run(session)` and return the last SQL statement it sent, with its parameters."""
    sent: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, params: Any, *_rest: Any) -> None:
        sent.append((statement, params))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", seen)
    try:
        run(session)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    return sent[-1]


def test_the_tag_filter_states_the_partial_index_predicate(db_session: Session) -> None:
    # No tenant condition: only the tag index can serve it, and only if its predicate holds.
    found = plan(db_session, JobFilter(tag="nightly").apply(select(Job.id)))
    assert "ix_jobs_tags" in found, found


def test_the_quota_counts_unfinished_jobs_by_state(db_session: Session) -> None:
    from datetime import UTC, datetime

    tenant = uuid.uuid4()
    sql, params = captured(db_session, lambda s: count_unfinished(s, tenant, 100))
    found = plan(db_session, sql, params)
    # Searched by tenant and state, not by tenant alone then filtered.
    assert "ix_jobs_tenant_state_created" in found, found
    assert "state)::text = ANY" in found.partition("Index Cond")[2], found
    sql, params = captured(db_session, lambda s: drain_rate(s, tenant, datetime.now(UTC), 300))
    found = plan(db_session, sql, params)
    assert "ix_jobs_tenant_finished" in found, found
