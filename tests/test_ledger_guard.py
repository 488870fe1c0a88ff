"""Only `conveyor.ledger` writes the ledger's tables: checked in the source and at run time."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import Engine, text

from tests.conftest import LEDGER_WRITES_ELSEWHERE, ROOT

PACKAGES = ("conveyor", "api", "worker")
# Every way the code base writes a table: Core constructs, the table's own methods, raw SQL,
# ORM objects added to a session.
WRITES = re.compile(
    r"\b(update|insert|delete)\((Job|JobEvent)\b"
    r"|\b(Job|JobEvent)\.__table__\.(update|insert|delete)\b"
    r"|\b(UPDATE|INSERT INTO|DELETE FROM)\s+(jobs|job_events)\b"
    r"|\.add\((Job|JobEvent)\(",
)


def sources() -> list[Path]:
    return [
        path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if not path.is_relative_to(ROOT / "conveyor" / "ledger")
    ]


def test_no_code_outside_the_ledger_writes_jobs_or_their_events() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sources()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if WRITES.search(line)
    ]
    assert found == []
    # The scan would see one: the ledger's own writes match it.
    ledger = (ROOT / "conveyor" / "ledger" / "upkeep.py").read_text()
    assert WRITES.search(ledger)


def test_a_write_from_outside_the_ledger_is_caught_when_it_runs(engine: Engine) -> None:
    # Code compiled as if it lived in api/: the run-time watch names it.
    outsider = compile(
        "with engine.begin() as conn:\n"
        "    conn.execute(text('UPDATE jobs SET priority = 0 WHERE false'))\n",
        str(ROOT / "api" / "outsider.py"),
        "exec",
    )
    exec(outsider, {"engine": engine, "text": text})
    caught = list(LEDGER_WRITES_ELSEWHERE)
    LEDGER_WRITES_ELSEWHERE.clear()  # seen: this test's own write must not fail it
    assert [entry.split(":")[0] for entry in caught] == ["api/outsider.py"]
