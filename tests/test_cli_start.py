"""`conveyor --help` starts fast: it imports no database, server or HTTP library (issue #20).

Measured by what the process imported, not by a clock: a timed test fails on a busy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Each of these took a tenth of a second or more to import (SQLAlchemy and the core: 1.5 s).
HEAVY = (
    "sqlalchemy",
    "psycopg",
    "pydantic",
    "conveyor.settings",
    "conveyor.ledger",
    "celery",
    "flask",
    "redis",
    "httpx",
    "alembic",
)


def _imported_after(code: str) -> set[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def _heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}


def test_help_imports_no_heavy_library() -> None:
    modules = _imported_after(
        "from conveyor.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['submit', '--help'])\nexcept SystemExit:\n    pass"
    )
    assert "conveyor.cli" in modules
    assert _heavy(modules) == set()


def test_a_client_command_imports_httpx_but_not_the_server_core() -> None:
    modules = _imported_after(
        "from conveyor.client import Client\nClient('http://127.0.0.1:9', 'k').close()"
    )
    assert "httpx" in modules
    assert _heavy(modules) == {m for m in modules if m == "httpx" or m.startswith("httpx.")}
