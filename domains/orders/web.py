"""`GET /v1/reports/daily-revenue`: the orders domain's route, built on what the API lends it."""

from __future__ import annotations

from datetime import date

from flask import Response, jsonify
from flask_openapi3.blueprint import APIBlueprint
from pydantic import BaseModel, ConfigDict, Field, model_validator

from conveyor.auth.roles import Permission
from conveyor.plugins import Web
from domains.orders import reports


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


def routes(web: Web) -> APIBlueprint:
    """Return the domain's blueprint, wired to the API that registers it."""
    bp = web.blueprint(
        "orders", __name__, description="The orders domain: reports over imported orders."
    )

    @bp.get("/v1/reports/daily-revenue", responses=web.responses({200: RevenueReport}, 422))
    @web.requires(Permission.READ)
    def daily_revenue(query: RevenueQuery) -> Response:
        """Read the revenue rollup for a date range (and currency), cached per tenant."""
        principal = web.principal()
        with web.sessions() as session:
            items, cached = reports.daily_revenue(
                session, web.redis, principal.tenant_id, query.start, query.end, query.currency
            )
        response = jsonify(items=items)
        response.headers["X-Cache"] = "hit" if cached else "miss"
        return response

    return bp
