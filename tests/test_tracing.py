"""Tracing on real PostgreSQL, Redis and a real Celery worker, spans caught in memory.

The API and the worker (thread pool) run in this process, so one in-memory exporter sees
both sides of a job: the HTTP request, the publish, the worker's run and their queries.
One test runs the worker as the Procfile does (a prefork subprocess) exporting over
OTLP/HTTP to a stub collector, and checks its spans continue the API's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from bench.tracing import CollectorStub
from conveyor.auth.bootstrap import Identity
from conveyor.models import Job
from conveyor.settings import Settings
from conveyor.telemetry.logs import configure_logging
from conveyor.telemetry.tracing import install_tracing, tracing_on, uninstall_tracing
from tests.conftest import Receiver, wait_for
from tests.processes import own_queue, process_env, start_worker
from worker.dispatcher import Dispatcher

pytestmark = pytest.mark.e2e

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module", autouse=True)
def exporter(settings: Settings, engine: Engine) -> Iterator[InMemorySpanExporter]:
    """Trace this module's API and worker into memory (before either is built)."""
    memory = InMemorySpanExporter()
    assert install_tracing(settings, "conveyor-test", exporter=memory)
    # psycopg is instrumented per connection: the session's pool may hold older ones.
    engine.dispose()
    yield memory
    uninstall_tracing()
    engine.dispose()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """Return the exporter, emptied of earlier tests' spans."""
    exporter.clear()
    return exporter


def hex_trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def finished(client: Any, auth: dict[str, str], job_id: str) -> dict[str, Any] | None:
    body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    return body if body["state"] in {"succeeded", "failed"} else None


def of_trace(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if hex_trace(s) == trace_id]


def named(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


def run_span(exporter: InMemorySpanExporter, trace_id: str, job_type: str) -> ReadableSpan:
    """Wait for the worker's run span of `job_type` in the trace (the worker ends it last)."""
    return wait_for(
        lambda: next((s for s in of_trace(exporter, trace_id) if s.name == f"run/{job_type}"), None)
    )


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


def test_one_job_is_one_trace_from_the_request_to_the_workers_queries(
    worker: Any, client: Any, auth: dict[str, str], spans: InMemorySpanExporter
) -> None:
    response = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth)
    assert response.status_code == 202
    job = response.get_json()
    trace_id = job["trace_id"]
    assert trace_id is not None
    assert len(trace_id) == 32
    assert wait_for(lambda: finished(client, auth, job["id"]))["state"] == "succeeded"
    run = run_span(spans, trace_id, "system.noop")

    trace = of_trace(spans, trace_id)
    by_id = {s.context.span_id: s for s in trace}
    request = named(trace, "POST /v1/jobs")
    assert request.kind == SpanKind.SERVER
    assert request.parent is None
    publish = named(trace, "conveyor.publish")
    assert publish.kind == SpanKind.PRODUCER
    assert publish.parent is not None
    assert publish.parent.span_id == request.context.span_id
    # The worker's run continues the request's trace under the publish.
    assert run.kind == SpanKind.CONSUMER
    assert run.parent is not None
    assert run.parent.span_id == publish.context.span_id
    for name in ("conveyor.claim", "conveyor.run", "conveyor.finish"):
        step = named(trace, name)
        assert ancestors(step, by_id)[0] == run.name, name
        assert step.attributes is not None
    assert named(trace, "conveyor.run").attributes["conveyor.job.id"] == job["id"]  # type: ignore[index]
    # The queries and Redis calls of both sides are children in the same trace.
    queries = [s for s in trace if (s.attributes or {}).get("db.system") == "postgresql"]
    redis_calls = [s for s in trace if (s.attributes or {}).get("db.system") == "redis"]
    assert any(request.name in ancestors(q, by_id) for q in queries)
    assert any(run.name in ancestors(q, by_id) for q in queries)
    assert any(run.name in ancestors(r, by_id) for r in redis_calls)
    assert any(request.name in ancestors(r, by_id) for r in redis_calls)
    # Every span of the job nests under the request: one tree, no orphans.
    assert all(s is request or request.name in ancestors(s, by_id) for s in trace)
    # Queries outside any request or job (the worker's heartbeats) make no traces.
    orphans = [s.name for s in spans.get_finished_spans() if s.parent is None]
    assert all(s.kind != SpanKind.CLIENT for s in spans.get_finished_spans() if s.parent is None), (
        orphans
    )


def test_a_callers_traceparent_is_continued_to_the_worker(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    spans: InMemorySpanExporter,
    sessions: sessionmaker[Session],
) -> None:
    headers = {
        **auth,
        "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
        "tracestate": "vendor=abc",
    }
    response = client.post("/v1/jobs", json={"type": "system.noop"}, headers=headers)
    job = response.get_json()
    assert job["trace_id"] == CALLER_TRACE
    request = named(of_trace(spans, CALLER_TRACE), "POST /v1/jobs")
    assert request.parent is not None
    assert format(request.parent.span_id, "016x") == CALLER_SPAN
    assert request.parent.is_remote
    run = run_span(spans, CALLER_TRACE, "system.noop")
    assert run.context.trace_state.get("vendor") == "abc"
    with sessions() as session:
        stored = session.scalar(select(Job.trace_context).where(Job.id == uuid.UUID(job["id"])))
    assert stored is not None
    assert stored["traceparent"].split("-")[1] == CALLER_TRACE
    assert stored["tracestate"] == "vendor=abc"


def test_a_dispatched_job_starts_its_own_trace_linked_to_its_submit(
    worker: Any, client: Any, auth: dict[str, str], spans: InMemorySpanExporter
) -> None:
    # A job under a limit waits in the ledger for the dispatcher, which publishes it later.
    response = client.post(
        "/v1/jobs", json={"type": "system.noop", "limit_key": "traced"}, headers=auth
    )
    job = response.get_json()
    assert job["waiting_for"] == "limit"
    submitted = job["trace_id"]
    assert Dispatcher.for_app(worker).run_once().published >= 1
    assert wait_for(lambda: finished(client, auth, job["id"]))["state"] == "succeeded"

    def dispatched() -> ReadableSpan | None:
        return next(
            (
                s
                for s in spans.get_finished_spans()
                if s.name == "conveyor.dispatch"
                and (s.attributes or {}).get("conveyor.job.id") == job["id"]
            ),
            None,
        )

    dispatch = wait_for(dispatched)
    assert dispatch.parent is None
    assert hex_trace(dispatch) != submitted
    assert [format(link.context.trace_id, "032x") for link in dispatch.links] == [submitted]
    run = run_span(spans, hex_trace(dispatch), "system.noop")
    assert run.parent is not None
    assert run.parent.span_id == dispatch.context.span_id
    # The view still names the trace of the request that submitted it.
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).get_json()["trace_id"] == submitted


def test_no_payload_token_or_key_lands_in_a_span(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    identity: Identity,
    receiver: str,
    spans: InMemorySpanExporter,
) -> None:
    marker = f"payload-{uuid.uuid4().hex}"
    secret = f"token-{uuid.uuid4().hex}"
    # An outbound call whose body, header and query string are all secret.
    payload = {
        "method": "POST",
        "url": f"{receiver}?token={secret}",
        "headers": {"X-Api-Key": secret},
        "json": {"card": marker},
    }
    request = {"type": "http.request", "payload": payload}
    response = client.post("/v1/jobs", json=request, headers=auth)
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    body = wait_for(lambda: finished(client, auth, job["id"]))
    assert body["state"] == "succeeded", body
    run = run_span(spans, job["trace_id"], "http.request")
    trace = of_trace(spans, job["trace_id"])
    by_id = {s.context.span_id: s for s in trace}
    (call,) = [s for s in trace if s.kind == SpanKind.CLIENT and s.name == "POST"]
    assert run.name in ancestors(call, by_id)
    assert call.attributes is not None
    assert call.attributes["http.response.status_code"] == 204
    assert call.attributes["url.full"].endswith("/hook")  # type: ignore[union-attr]
    # The receiver got the job's trace context, so it can continue it.
    (headers, _) = next(r for r in Receiver.received if marker in r[1].decode())
    assert headers["traceparent"].split("-")[1] == job["trace_id"]

    texts = json.dumps(
        [
            {
                "name": s.name,
                "attributes": dict(s.attributes or {}),
                "events": [dict(e.attributes or {}) for e in s.events],
                "resource": dict(s.resource.attributes),
            }
            for s in spans.get_finished_spans()
        ],
        default=str,
    )
    for needle in (marker, secret, identity.token, auth["Authorization"]):
        assert needle not in texts


def test_log_lines_inside_a_traced_job_carry_its_trace_and_span(
    worker: Any,
    client: Any,
    auth: dict[str, str],
    spans: InMemorySpanExporter,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(settings.model_copy(update={"log_format": "json"}))
    try:
        job = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).get_json()
        run_span(spans, job["trace_id"], "system.noop")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    finally:
        configure_logging(settings)
    # The request's lines and the run's; not the consumer's "received", logged before the
    # job runs (outside its trace), as Celery's own receiving of any message.
    mine = [
        line
        for line in lines
        if line.get("job_id") == job["id"] and line["logger"] != "celery.worker.strategy"
    ]
    assert {line["logger"] for line in mine} >= {"api.jobs", "celery.app.trace"}, lines
    span_ids = {format(s.context.span_id, "016x") for s in of_trace(spans, job["trace_id"])}
    for line in mine:
        assert line["trace_id"] == job["trace_id"], line
        assert line["span_id"] in span_ids, line


def test_tracing_is_off_and_the_sdk_unloaded_without_otel_variables(settings: Settings) -> None:
    assert tracing_on()  # this module's own exporter
    assert not settings.tracing
    on = settings.model_copy(update={"otel_endpoint": "http://127.0.0.1:4318/"})
    assert on.tracing
    assert on.otlp_traces_url == "http://127.0.0.1:4318/v1/traces"
    disabled = {"otel_endpoint": "http://127.0.0.1:4318", "otel_sdk_disabled": True}
    assert not settings.model_copy(update=disabled).tracing
    # A fresh process: building the API and the worker app loads no SDK, installs nothing.
    code = (
        "import sys; from api import create_app; from worker.app import create_celery_app;"
        "create_app(); create_celery_app();"
        "from conveyor.telemetry.tracing import tracing_on;"
        "print(tracing_on(), 'opentelemetry.sdk.trace' in sys.modules)"
    )
    env = {k: v for k, v in process_env(settings).items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-2:] == ["False", "False"], out.stderr


def test_a_schedules_fire_is_a_trace_of_its_own_that_its_job_keeps(
    db_session: Session, spans: InMemorySpanExporter
) -> None:
    from conveyor.ledger.work import UnitOfWork
    from conveyor.registry import load_job_types
    from conveyor.schedules import ScheduleSpec, create_schedule, fire_due_schedules
    from tests.factories import tenant_factory

    registry = load_job_types(["conveyor.jobtypes.system"])
    tenant = tenant_factory(db_session).id
    now = datetime.now(UTC)
    spec = ScheduleSpec.model_validate(
        {"name": "traced", "job_type": "system.noop", "interval_seconds": 60}
    )
    schedule = create_schedule(db_session, registry, tenant, spec, default_queue="q", now=now)
    schedule.next_run_at = now - timedelta(seconds=1)
    (job,) = fire_due_schedules(
        UnitOfWork.around(db_session), registry, now, default_queue="q", misfire_grace=60
    )
    fire = named(spans.get_finished_spans(), "conveyor.schedule.fire")
    assert fire.parent is None
    assert (fire.attributes or {})["conveyor.schedule.id"] == str(schedule.id)
    # The job keeps the fire's context: its run, published after the pass, links to it.
    assert job.view["trace_id"] == hex_trace(fire)
    inserts = [s for s in of_trace(spans, hex_trace(fire)) if s.name != fire.name]
    assert inserts
    assert all(s.parent is not None and s.parent.span_id == fire.context.span_id for s in inserts)


def test_a_prefork_worker_continues_the_trace_and_exports_it_over_otlp(
    settings: Settings,
    make_app: Any,
    auth: dict[str, str],
    spans: InMemorySpanExporter,
    tmp_path: Path,
) -> None:
    # The worker as the Procfile runs it (prefork: it installs tracing in its pool child),
    # its spans sent over OTLP/HTTP to a stub collector; the API's caught in memory.
    own = own_queue(settings, "traced")
    with CollectorStub() as collector:
        collector.keep = True
        worker = start_worker(
            own,
            tmp_path,
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        try:
            client = make_app(default_queue=own.default_queue).test_client()
            job = client.post("/v1/jobs", json={"type": "system.noop"}, headers=auth).get_json()
            assert wait_for(lambda: finished(client, auth, job["id"]))["state"] == "succeeded"

            def exported() -> list[dict[str, Any]]:
                found = collector.spans_of(job["trace_id"])
                return found if any(s["name"] == "run/system.noop" for s in found) else []

            remote = wait_for(exported)
        finally:
            worker.stop()
    publish = named(of_trace(spans, job["trace_id"]), "conveyor.publish")
    run = next(s for s in remote if s["name"] == "run/system.noop")
    assert run["parent"] == format(publish.context.span_id, "016x")
    assert run["service"] == "conveyor-worker"
    names = {s["name"] for s in remote}
    assert {"conveyor.claim", "conveyor.run", "conveyor.finish"} <= names
    # Every exported span of the worker hangs under its run span.
    ids = {s["id"] for s in remote}
    assert all(s["parent"] in ids for s in remote if s is not run)


def test_a_callback_delivery_starts_a_trace_linked_to_its_jobs_with_its_http_call(
    worker: Any, client: Any, auth: dict[str, str], receiver: str, spans: InMemorySpanExporter
) -> None:
    from tests.test_webhooks import drive

    url = f"{receiver}?token=callback-secret"
    job = client.post(
        "/v1/jobs", json={"type": "system.noop", "callback_url": url}, headers=auth
    ).get_json()
    assert wait_for(lambda: finished(client, auth, job["id"]))["state"] == "succeeded"
    # Deliveries wait in the ledger for beat's promoter: drive it, as beat would.
    drive(worker, lambda: Receiver.received)

    def delivery_run() -> ReadableSpan | None:
        for dispatch in spans.get_finished_spans():
            if dispatch.name != "conveyor.dispatch" or not dispatch.links:
                continue
            if format(dispatch.links[0].context.trace_id, "032x") != job["trace_id"]:
                continue
            return next(
                (
                    s
                    for s in of_trace(spans, hex_trace(dispatch))
                    if s.name == "run/webhooks.deliver"
                ),
                None,
            )
        return None

    run = wait_for(delivery_run)
    trace = of_trace(spans, hex_trace(run))
    by_id = {s.context.span_id: s for s in trace}
    (call,) = [s for s in trace if s.kind == SpanKind.CLIENT and s.name == "POST"]
    assert run.name in ancestors(call, by_id)
    assert "callback-secret" not in str(dict(call.attributes or {}))
    assert Receiver.received[0][0]["traceparent"].split("-")[1] == hex_trace(run)
