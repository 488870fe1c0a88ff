"""schedules

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 08:32:03.872019
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("job_type", sa.String(length=200), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("interval_seconds", sa.Integer(), nullable=True),
        sa.Column("enabled", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("misfire_policy", sa.String(length=20), server_default="skip", nullable=False),
        sa.Column("overlap_policy", sa.String(length=20), server_default="allow", nullable=False),
        sa.Column(
            "options", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_job_id", sa.Uuid(), nullable=True),
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
            "(cron IS NULL) <> (interval_seconds IS NULL)", name=op.f("ck_schedules_one_timing")
        ),
        sa.CheckConstraint(
            "interval_seconds IS NULL OR interval_seconds >= 1", name=op.f("ck_schedules_interval")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_schedules_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_schedules_tenant_id")),
    )
    op.create_index(
        "ix_schedules_due", "schedules", ["next_run_at"], unique=False, postgresql_where="enabled"
    )
    op.add_column(
        "jobs", sa.Column("schedule_occurrence", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "uq_jobs_schedule_occurrence",
        "jobs",
        ["schedule_id", "schedule_occurrence"],
        unique=True,
        postgresql_where="schedule_occurrence IS NOT NULL",
    )
    op.create_foreign_key(
        op.f("fk_jobs_schedule_id_schedules"),
        "jobs",
        "schedules",
        ["schedule_id"],
        ["id"],
        ondelete="SET NULL",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("fk_jobs_schedule_id_schedules"), "jobs", type_="foreignkey")
    op.drop_index(
        "uq_jobs_schedule_occurrence",
        table_name="jobs",
        postgresql_where="schedule_occurrence IS NOT NULL",
    )
    op.drop_column("jobs", "schedule_occurrence")
    op.drop_index("ix_schedules_due", table_name="schedules", postgresql_where="enabled")
    op.drop_table("schedules")
