"""index jobs for the console: a tenant's jobs by state, and its unfinished work by queue

Revision ID: 0017_console_indexes
Revises: 0016_tracing
Create Date: 2026-12-08 00:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017_console_indexes"
down_revision: str | None = "0016_tracing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The job list filtered by state (the console's and GET /v1/jobs?state=), newest first:
    # without it a state with few jobs scans the tenant's whole history.
    op.create_index(
        "ix_jobs_tenant_state_created",
        "jobs",
        ["tenant_id", "state", "created_at", "id"],
        unique=False,
    )
    # Queue stats (the overview, GET /v1/queues): only queued and running jobs, so small.
    op.create_index(
        "ix_jobs_tenant_active_queue",
        "jobs",
        ["tenant_id", "queue"],
        unique=False,
        postgresql_where=sa.text("state IN ('queued', 'running')"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_active_queue", table_name="jobs")
    op.drop_index("ix_jobs_tenant_state_created", table_name="jobs")
