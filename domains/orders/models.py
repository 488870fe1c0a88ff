"""The orders domain's tables, on Conveyor's metadata so one Alembic history covers both."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import CHAR, ForeignKey, Numeric, String, func
from sqlalchemy.orm import Mapped, mapped_column

from conveyor.models import Base


class Order(Base):
    """An order imported from a tenant's CSV; (tenant, external id) is its identity."""

    __tablename__ = "orders"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    external_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_email: Mapped[str] = mapped_column(String(320))
    amount: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    currency: Mapped[str] = mapped_column(CHAR(3))
    ordered_at: Mapped[datetime]
    imported_at: Mapped[datetime] = mapped_column(server_default=func.now())


class DailyRevenue(Base):
    """Orders rolled up per tenant, day (UTC) and currency."""

    __tablename__ = "daily_revenue"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[date] = mapped_column(primary_key=True)
    currency: Mapped[str] = mapped_column(CHAR(3), primary_key=True)
    orders: Mapped[int]
    total: Mapped[Decimal] = mapped_column(Numeric(16, 2))
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
