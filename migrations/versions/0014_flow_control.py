"""flow control: limits, queue pauses, unique keys, and why a job waits

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 21:45:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "limits",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("per_second", sa.Double(), nullable=True),
        sa.Column("running", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "starts",
            postgresql.ARRAY(sa.DateTime(timezone=True)),
            server_default="{}",
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "max_running IS NULL OR max_running >= 1", name=op.f("ck_limits_max_running")
        ),
        sa.CheckConstraint(
            "per_second IS NULL OR per_second > 0", name=op.f("ck_limits_per_second")
        ),
        sa.CheckConstraint("running >= 0", name=op.f("ck_limits_running")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_limits_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_limits")),
    )
    op.create_index(
        "uq_limits_global_key", "limits", ["key"], unique=True, postgresql_where="tenant_id IS NULL"
    )
    op.create_index(
        "uq_limits_tenant_key",
        "limits",
        ["tenant_id", "key"],
        unique=True,
        postgresql_where="tenant_id IS NOT NULL",
    )
    op.create_table(
        "queue_pauses",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_queue_pauses_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queue_pauses")),
    )
    op.create_index(
        "uq_queue_pauses_global_queue",
        "queue_pauses",
        ["queue"],
        unique=True,
        postgresql_where="tenant_id IS NULL",
    )
    op.create_index(
        "uq_queue_pauses_tenant_queue",
        "queue_pauses",
        ["tenant_id", "queue"],
        unique=True,
        postgresql_where="tenant_id IS NOT NULL",
    )
    op.create_table(
        "unique_keys",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("held_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_unique_keys_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "type", "key", name=op.f("pk_unique_keys")),
    )
    op.create_index("ix_unique_keys_job_id", "unique_keys", ["job_id"], unique=False)
    op.add_column("jobs", sa.Column("limit_key", sa.String(length=100), nullable=True))
    op.add_column("jobs", sa.Column("waiting_for", sa.String(length=20), nullable=True))
    op.create_index(
        "ix_jobs_in_flight",
        "jobs",
        ["queue", "limit_key"],
        unique=False,
        postgresql_where="state = 'queued' AND published_at IS NOT NULL",
    )
    op.create_index(
        "ix_jobs_undispatched",
        "jobs",
        ["queue", "tenant_id", sa.literal_column("priority DESC"), "created_at", "id"],
        unique=False,
        postgresql_where="state = 'queued' AND published_at IS NULL",
    )


def downgrade() -> None:
    op.drop_index(
        "ix_jobs_undispatched",
        table_name="jobs",
        postgresql_where="state = 'queued' AND published_at IS NULL",
    )
    op.drop_index(
        "ix_jobs_in_flight",
        table_name="jobs",
        postgresql_where="state = 'queued' AND published_at IS NOT NULL",
    )
    op.drop_column("jobs", "waiting_for")
    op.drop_column("jobs", "limit_key")
    op.drop_index("ix_unique_keys_job_id", table_name="unique_keys")
    op.drop_table("unique_keys")
    op.drop_index(
        "uq_queue_pauses_tenant_queue",
        table_name="queue_pauses",
        postgresql_where="tenant_id IS NOT NULL",
    )
    op.drop_index(
        "uq_queue_pauses_global_queue",
        table_name="queue_pauses",
        postgresql_where="tenant_id IS NULL",
    )
    op.drop_table("queue_pauses")
    op.drop_index(
        "uq_limits_tenant_key", table_name="limits", postgresql_where="tenant_id IS NOT NULL"
    )
    op.drop_index("uq_limits_global_key", table_name="limits", postgresql_where="tenant_id IS NULL")
    op.drop_table("limits")
