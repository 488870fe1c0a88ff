"""`GET /v1/reports/daily-revenue`: the orders domain's route, added by `CONVEYOR_API_MODULES`."""

from __future__ import annotations

from datetime import date

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.auth import authorize
from api.requests import parse_query
from api.services import services
from conveyor.roles import Permission
from worker.orders import reports

bp = Blueprint("orders", __name__)


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


@bp.get("/v1/reports/daily-revenue")
def daily_revenue() -> Response:
    """Read the revenue rollup for a date range (and currency), cached per tenant."""
    principal = authorize(Permission.READ)
    query = parse_query(RevenueQuery)
    svc = services()
    with svc.sessions() as session:
        items, cached = reports.daily_revenue(
            session, svc.redis, principal.tenant_id, query.start, query.end, query.currency
        )
    response = jsonify(items=items)
    response.headers["X-Cache"] = "hit" if cached else "miss"
    return response
