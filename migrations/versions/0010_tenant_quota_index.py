"""index jobs by tenant and finish time for the unfinished-jobs quota

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26 10:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_tenant_finished", "jobs", ["tenant_id", "finished_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_finished", table_name="jobs")
