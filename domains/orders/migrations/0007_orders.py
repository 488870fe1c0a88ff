"""orders domain: the base of the orders branch

Revision ID: 0007
Revises: (none: the base of the `orders` branch)
Depends on: 0006
Create Date: 2026-11-26 08:42:51.004936
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0007"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("orders",)
# The core revision this branch comes after: its tables need only `tenants` (0001), but a
# database that stopped at this revision when it sat in the core's chain (0006 -> 0007)
# then reads as having the core up to 0006, which is true.
depends_on: str | Sequence[str] | None = "0006"


def _absent(table: str) -> bool:
    """Return whether `table` still has to be created (always, when only emitting SQL)."""
    if context.is_offline_mode():
        return True
    return not sa.inspect(op.get_bind()).has_table(table)


def upgrade() -> None:
    # Databases migrated before the domain became a plugin already have these tables (this
    # revision sat in the core's chain then), yet do not record this branch: they get the
    # branch recorded, and their tables and rows left as they are.
    if _absent("daily_revenue"):
        _create_daily_revenue()
    if _absent("orders"):
        _create_orders()


def _create_daily_revenue() -> None:
    op.create_table(
        "daily_revenue",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("currency", sa.CHAR(length=3), nullable=False),
        sa.Column("orders", sa.Integer(), nullable=False),
        sa.Column("total", sa.Numeric(precision=16, scale=2), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_daily_revenue_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "day", "currency", name=op.f("pk_daily_revenue")),
    )


def _create_orders() -> None:
    op.create_table(
        "orders",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("external_id", sa.String(length=64), nullable=False),
        sa.Column("customer_email", sa.String(length=320), nullable=False),
        sa.Column("amount", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.Column("currency", sa.CHAR(length=3), nullable=False),
        sa.Column("ordered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "imported_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_orders_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "external_id", name=op.f("pk_orders")),
    )


def downgrade() -> None:
    op.drop_table("orders")
    op.drop_table("daily_revenue")
