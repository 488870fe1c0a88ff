"""job options, cancel requests and idempotency keys

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 08:13:51.265918
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_idempotency_keys_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index(
        op.f("ix_idempotency_keys_created_at"), "idempotency_keys", ["created_at"], unique=False
    )
    op.add_column(
        "jobs", sa.Column("priority", sa.SmallInteger(), server_default="0", nullable=False)
    )
    op.add_column(
        "jobs",
        sa.Column(
            "tags", postgresql.ARRAY(sa.String(length=64)), server_default="{}", nullable=False
        ),
    )
    op.add_column(
        "jobs",
        sa.Column(
            "metadata", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
    )
    op.create_check_constraint(op.f("ck_jobs_priority"), "jobs", "priority BETWEEN 0 AND 9")
    op.add_column("jobs", sa.Column("schedule_id", sa.Uuid(), nullable=True))
    op.add_column("jobs", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "jobs", sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.drop_index(op.f("ix_jobs_tenant_created"), table_name="jobs")
    op.create_index(
        "ix_jobs_tenant_created", "jobs", ["tenant_id", "created_at", "id"], unique=False
    )
    op.create_index(
        "ix_jobs_finished",
        "jobs",
        ["finished_at"],
        unique=False,
        postgresql_where="finished_at IS NOT NULL",
    )
    op.create_index("ix_jobs_tags", "jobs", ["tags"], unique=False, postgresql_using="gin")


def downgrade() -> None:
    op.drop_index("ix_jobs_tags", table_name="jobs", postgresql_using="gin")
    op.drop_index("ix_jobs_finished", table_name="jobs", postgresql_where="finished_at IS NOT NULL")
    op.drop_index("ix_jobs_tenant_created", table_name="jobs")
    op.create_index(
        op.f("ix_jobs_tenant_created"), "jobs", ["tenant_id", "created_at"], unique=False
    )
    op.drop_column("jobs", "cancel_requested_at")
    op.drop_column("jobs", "expires_at")
    op.drop_column("jobs", "schedule_id")
    op.drop_column("jobs", "metadata")
    op.drop_column("jobs", "tags")
    op.drop_constraint(op.f("ck_jobs_priority"), "jobs", type_="check")
    op.drop_column("jobs", "priority")
    op.drop_index(op.f("ix_idempotency_keys_created_at"), table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
