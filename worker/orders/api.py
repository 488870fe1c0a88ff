"""`GET /v1/reports/daily-revenue`: the orders domain's route, added by `CONVEYOR_API_MODULES`."""

from __future__ import annotations

from datetime import date

from flask import Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.auth import current_principal, requires
from api.openapi import responses, secured_blueprint
from api.services import services
from conveyor.roles import Permission
from worker.orders import reports

bp = secured_blueprint(
    "orders", __name__, "orders", description="The orders domain: reports over imported orders."
)


class RevenueQuery(BaseModel):
    """Query parameters of the report."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    start: date = Field(alias="from")
    end: date = Field(alias="to")
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")

    @model_validator(mode="after")
    def _ordered(self) -> RevenueQuery:
        if self.end < self.start:
            raise ValueError("`to` is before `from`")
        return self


class DailyRevenue(BaseModel):
    """One day's orders and revenue in one currency."""

    day: date
    currency: str
    orders: int
    total: str = Field(pattern=r"^-?[0-9]+(\.[0-9]+)?$", examples=["15.50"])


class RevenueReport(BaseModel):
    """`GET /v1/reports/daily-revenue`."""

    items: list[DailyRevenue]


@bp.get("/v1/reports/daily-revenue", responses=responses({200: RevenueReport}, 422))
@requires(Permission.READ)
def daily_revenue(query: RevenueQuery) -> Response:
    """Read the revenue rollup for a date range (and currency), cached per tenant."""
    principal = current_principal()
    svc = services()
    with svc.sessions() as session:
        items, cached = reports.daily_revenue(
            session, svc.redis, principal.tenant_id, query.start, query.end, query.currency
        )
    response = jsonify(items=items)
    response.headers["X-Cache"] = "hit" if cached else "miss"
    return response
