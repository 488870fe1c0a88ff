"""index running jobs by heartbeat for the reaper

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 08:09:15.921451
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_running_heartbeat",
        "jobs",
        ["heartbeat_at"],
        unique=False,
        postgresql_where="state = 'running'",
    )


def downgrade() -> None:
    op.drop_index(
        "ix_jobs_running_heartbeat", table_name="jobs", postgresql_where="state = 'running'"
    )
