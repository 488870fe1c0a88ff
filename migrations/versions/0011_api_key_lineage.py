"""remember which key created a key, so revoking it revokes its descendants

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 20:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("created_by_key_id", sa.Uuid(), nullable=True))
    op.create_index(
        op.f("ix_api_keys_created_by_key_id"), "api_keys", ["created_by_key_id"], unique=False
    )
    op.create_foreign_key(
        op.f("fk_api_keys_created_by_key_id_api_keys"),
        "api_keys",
        "api_keys",
        ["created_by_key_id"],
        ["id"],
        ondelete="SET NULL",
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("fk_api_keys_created_by_key_id_api_keys"), "api_keys", type_="foreignkey"
    )
    op.drop_index(op.f("ix_api_keys_created_by_key_id"), table_name="api_keys")
    op.drop_column("api_keys", "created_by_key_id")
