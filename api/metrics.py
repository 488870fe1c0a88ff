"""`GET /metrics`: HTTP, job and queue metrics for Prometheus, behind a bearer token.

Under gunicorn (`api.gunicorn_config` sets `PROMETHEUS_MULTIPROC_DIR`) every worker
process writes its samples to a shared directory and any one of them answers a scrape
with the sum: the totals are right whichever worker Prometheus reaches.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

from api.queues import read_queues
from api.services import Services, services
from conveyor.errors import Forbidden, Unauthorized
from conveyor.ledger.flow import FlowStats, flow_stats
from conveyor.telemetry.metrics import (
    FlowCollector,
    QueueCollector,
    scrape_registry,
    token_matches,
    usable_accept,
)
from conveyor.telemetry.metrics_dir import multiprocess_dir

bp = Blueprint("metrics", __name__)


def init_app(app: Flask) -> None:
    """Count every request by endpoint, method and status, and serve `/metrics`."""
    # By endpoint, not path: a path holds job ids, and a label per job would never end.
    options = {"group_by": "endpoint", "excluded_paths": ["^/metrics$"]}
    if multiprocess_dir():
        # path=None either way: our own route serves the scrape, with the token check.
        exporter: PrometheusMetrics = GunicornPrometheusMetrics(app, **options)
    else:
        # One process (tests, `flask run`): a registry per app, so apps can coexist.
        exporter = PrometheusMetrics(app, path=None, registry=CollectorRegistry(), **options)
    app.extensions["conveyor_metrics"] = exporter
    app.register_blueprint(bp)


def _flow(svc: Services) -> FlowStats:
    with svc.work.reading() as session:
        return flow_stats(session)


@bp.get("/metrics")
def scrape() -> Response:
    """Render every process's metrics plus live queue gauges, for a caller with the token."""
    svc = services()
    token = svc.settings.metrics_token.get_secret_value()
    if token:
        if not token_matches(token, request.headers.get("Authorization")):
            raise Unauthorized("send 'Authorization: Bearer <CONVEYOR_METRICS_TOKEN>'")
    elif svc.settings.env != "development":
        raise Forbidden("/metrics is closed until CONVEYOR_METRICS_TOKEN is set")
    exporter: PrometheusMetrics = current_app.extensions["conveyor_metrics"]
    registry = scrape_registry(
        QueueCollector(lambda: read_queues(svc)),
        FlowCollector(lambda: _flow(svc)),
        local=[exporter.registry],
    )
    encode, content_type = choose_encoder(usable_accept(request.headers.get("Accept")))
    return Response(encode(registry), content_type=content_type)
