"""index uploads by tenant and size for the storage quota

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_uploads_tenant_size", "uploads", ["tenant_id", "size"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_uploads_tenant_size", table_name="uploads")
