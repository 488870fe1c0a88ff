"""The sample business domain: orders imported from CSV, revenue rolled up, orders exported.

`domain` below is all Conveyor sees of it, through the entry point `orders` in the
`conveyor.domains` group (pyproject.toml). To replace it with your own, delete this package
and that entry point: nothing in `api/`, `worker/` or `migrations/` names it. Its job-type
modules hold plain functions and Pydantic models, never Celery code: the API imports them
too, to validate payloads.
"""

from __future__ import annotations

from pathlib import Path

from conveyor.plugins import Domain

domain = Domain(
    name="orders",
    job_modules=("domains.orders.jobs",),
    models="domains.orders.models",
    routes="domains.orders.web:routes",
    migrations=Path(__file__).parent / "migrations",
)
