"""claim token: a fresh id per claim, which every finish and heartbeat of that claim names

Revision ID: 0019_claim_token
Revises: 0017_console_indexes
Create Date: 2026-12-08 03:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019_claim_token"
down_revision: str | None = "0018_jobs_index_diet"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: PostgreSQL adds the column without rewriting the table. A job
    # claimed before the upgrade has no token: the finish guard matches NULL to NULL
    # (`IS NOT DISTINCT FROM`), so the reaper and the hard time limit still end it.
    op.add_column("jobs", sa.Column("claim_token", sa.Uuid(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "claim_token")
