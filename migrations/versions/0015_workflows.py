"""workflows: jobs that depend on jobs, and the workflows that group them

Revision ID: 0015_workflows
Revises: 0014
Create Date: 2026-12-08 00:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_workflows"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workflows",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=20), server_default="running", nullable=False),
        sa.Column("total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("unfinished", sa.Integer(), server_default="0", nullable=False),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_workflows_state"),
        ),
        sa.CheckConstraint("unfinished >= 0", name=op.f("ck_workflows_unfinished")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_workflows_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflows")),
    )
    op.create_index(
        "ix_workflows_tenant_created", "workflows", ["tenant_id", "created_at", "id"], unique=False
    )
    # Constant defaults: PostgreSQL adds the columns without rewriting the table.
    op.add_column("jobs", sa.Column("workflow_id", sa.Uuid(), nullable=True))
    op.add_column("jobs", sa.Column("workflow_ref", sa.String(length=100), nullable=True))
    op.add_column(
        "jobs", sa.Column("dependencies_left", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "jobs", sa.Column("has_dependents", sa.Boolean(), server_default="false", nullable=False)
    )
    op.add_column("jobs", sa.Column("on_dependency_failure", sa.String(length=10), nullable=True))
    op.create_foreign_key(
        op.f("fk_jobs_workflow_id_workflows"),
        "jobs",
        "workflows",
        ["workflow_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_check_constraint(op.f("ck_jobs_dependencies_left"), "jobs", "dependencies_left >= 0")
    op.create_index(
        "uq_jobs_workflow_ref",
        "jobs",
        ["workflow_id", "workflow_ref"],
        unique=True,
        postgresql_where="workflow_id IS NOT NULL",
    )
    op.create_table(
        "job_dependencies",
        sa.Column("depends_on_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["depends_on_id"],
            ["jobs.id"],
            name=op.f("fk_job_dependencies_depends_on_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_job_dependencies_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("depends_on_id", "job_id", name=op.f("pk_job_dependencies")),
    )
    op.create_index("ix_job_dependencies_job_id", "job_dependencies", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_job_dependencies_job_id", table_name="job_dependencies")
    op.drop_table("job_dependencies")
    op.drop_index(
        "uq_jobs_workflow_ref", table_name="jobs", postgresql_where="workflow_id IS NOT NULL"
    )
    op.drop_constraint(op.f("ck_jobs_dependencies_left"), "jobs", type_="check")
    op.drop_constraint(op.f("fk_jobs_workflow_id_workflows"), "jobs", type_="foreignkey")
    for name in (
        "on_dependency_failure",
        "has_dependents",
        "dependencies_left",
        "workflow_ref",
        "workflow_id",
    ):
        op.drop_column("jobs", name)
    op.drop_index("ix_workflows_tenant_created", table_name="workflows")
    op.drop_table("workflows")
