"""index diet on jobs: the tag index holds only tagged jobs, the finish index only finished ones

Revision ID: 0018_jobs_index_diet
Revises: 0017_console_indexes
Create Date: 2026-12-08 03:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018_jobs_index_diet"
down_revision: str | None = "0017_console_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every new row version of a job entered both: a GIN entry for an empty tag array, and
    # a (tenant, NULL) entry while unfinished. The job list's tag filter states the
    # predicate; the quota counts unfinished jobs by state (ix_jobs_tenant_state_created).
    op.drop_index("ix_jobs_tags", table_name="jobs")
    op.create_index(
        "ix_jobs_tags",
        "jobs",
        ["tags"],
        unique=False,
        postgresql_using="gin",
        postgresql_where=sa.text("tags <> '{}'"),
    )
    op.drop_index("ix_jobs_tenant_finished", table_name="jobs")
    op.create_index(
        "ix_jobs_tenant_finished",
        "jobs",
        ["tenant_id", "finished_at"],
        unique=False,
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_finished", table_name="jobs")
    op.create_index("ix_jobs_tenant_finished", "jobs", ["tenant_id", "finished_at"], unique=False)
    op.drop_index("ix_jobs_tags", table_name="jobs")
    op.create_index("ix_jobs_tags", "jobs", ["tags"], unique=False, postgresql_using="gin")
