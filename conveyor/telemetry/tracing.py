"""Traces with OpenTelemetry: one trace from the HTTP request to the job's last query.

Off unless OpenTelemetry's own variables ask for it (`Settings.tracing`: an OTLP endpoint,
or `OTEL_TRACES_EXPORTER=console`); then `install_tracing` sets up the SDK once per
process, with the instrumentations made for our libraries: Flask (per app,
`instrument_flask`), Celery (the worker's run span), psycopg (every query), redis-py and
httpx (the Python client, job code). While it is off nothing here builds a span, and the
SDK is never imported.

Conveyor adds spans of its own only where no instrumentation sees the step: the publish of
job messages, the dispatch of a job published after its submit, a schedule's fire, the
claim, run and finish of a job in the worker, and outbound HTTP through
`conveyor.outbound` (webhook deliveries, `http.request` jobs: `http.client`, which no
instrumentation covers). The job's context travels in its Celery
message headers (`traceparent`, `tracestate`), written by Conveyor's publisher, since it
publishes by task name in batches: the Celery instrumentor's own publish hook finds no task
in a process that only publishes by name, and leaves its span open (so it is not used).

Client spans (queries, Redis commands, HTTP calls) that no traced request or job encloses,
such as a heartbeat's or the housekeeping's, are not sampled: each would be a trace of one
span every second.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from flask import Flask
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import TraceState
    from opentelemetry.util.types import Attributes

    from conveyor.settings import Settings

logger = logging.getLogger(__name__)

# Tracer name of Conveyor's own spans.
TRACER = "conveyor"
# The span attributes Conveyor sets on its own spans.
JOB_ID = "conveyor.job.id"
JOB_TYPE = "conveyor.job.type"
JOB_ATTEMPT = "conveyor.job.attempt"
JOB_OUTCOME = "conveyor.job.outcome"

_provider: TracerProvider | None = None


def tracing_on() -> bool:
    """Return whether this process traces (`install_tracing` ran)."""
    return _provider is not None


def install_tracing(
    settings: Settings, service: str, *, exporter: SpanExporter | None = None
) -> bool:
    """Set up the SDK and the instrumentations once in this process if tracing is on.

    Return whether the process traces. `exporter` replaces the configured one and turns
    tracing on whatever the settings say: tests pass an in-memory exporter. A prefork
    worker calls this in each pool child (`worker_process_init`), after the fork.
    """
    global _provider
    if _provider is not None:
        return True
    if exporter is None and not settings.tracing:
        return False
    # The SDK is imported only here, so a process that does not trace never loads it.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased

    resource = Resource.create()
    # OTEL_SERVICE_NAME (read by Resource.create) wins over the process's own name.
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service}))
    provider = TracerProvider(resource=resource)
    # The sampler the SDK read from OTEL_TRACES_SAMPLER, for the roots it lets through.
    provider.sampler = ParentBased(root=_no_orphan_clients(provider.sampler))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif settings.otel_traces_exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        # The endpoint as Settings read it (a .env file too); the exporter reads the other
        # OTEL_EXPORTER_OTLP_* variables (headers, timeout, compression) itself.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exported = OTLPSpanExporter(endpoint=settings.otlp_traces_url)
        provider.add_span_processor(BatchSpanProcessor(exported))
    if exporter is None:
        # The global provider serves any library a job function traces with; tests keep
        # theirs private so that `uninstall_tracing` can take it back.
        trace.set_tracer_provider(provider)
    _instrument_libraries(provider)
    _provider = provider
    where = "memory" if exporter is not None else settings.otlp_traces_url or "stdout"
    logger.info("tracing on: spans of %s go to %s", service, where)
    return True


def uninstall_tracing() -> None:
    """Undo `install_tracing`: remove the instrumentations and flush the spans (tests)."""
    global _provider
    if _provider is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    for instrumentor in (
        PsycopgInstrumentor(),
        RedisInstrumentor(),
        HTTPXClientInstrumentor(),
        _run_instrumentor(),
    ):
        instrumentor.uninstrument()
    _provider.shutdown()
    _provider = None


def _instrument_libraries(provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    # Not SQLAlchemy's instrumentor: 0.66b2 refuses SQLAlchemy 2.1 (PITFALLS.md). psycopg's
    # records each statement's text, whose values are bound parameters, never inlined.
    PsycopgInstrumentor().instrument(tracer_provider=provider, skip_dep_check=True)
    # Its statements are sanitised: the command and a `?` per argument.
    RedisInstrumentor().instrument(tracer_provider=provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider, request_hook=_hide_query)
    _run_instrumentor().instrument(tracer_provider=provider)


def _hide_query(span: Any, request: Any) -> None:
    """Keep a URL's query string out of its span: a callback URL may carry a token there."""
    if not getattr(span, "is_recording", lambda: False)():
        return
    url = str(request.url).split("?", 1)[0].split("#", 1)[0]
    for key in ("url.full", "http.url"):
        if key in (getattr(span, "attributes", None) or {}):
            span.set_attribute(key, url)


@functools.cache
def _run_instrumentor_class() -> Any:
    """Return the Celery instrumentor that makes the worker's run span, and nothing else.

    `CeleryInstrumentor` continues the trace of a message's `traceparent` header in its
    `run/<task>` span (task_prerun to task_postrun). Its publish hooks are replaced with
    no-ops: Conveyor's publisher writes the headers itself (see the module's docstring).
    Overriding them relies on 0.66b2 connecting `self._trace_before_publish` and
    `self._trace_after_publish` to Celery's signals; tests/test_tracing.py would see a
    second publish span or a lost context if that changed.
    """
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    class RunInstrumentor(CeleryInstrumentor):
        def _trace_before_publish(self, *_: Any, **__: Any) -> None:
            return None

        @staticmethod
        def _trace_after_publish(*_: Any, **__: Any) -> None:
            return None

    return RunInstrumentor


def _run_instrumentor() -> Any:
    # Instrumentors are singletons per class: this is the same one every call.
    return _run_instrumentor_class()()


def _no_orphan_clients(inner: Sampler) -> Sampler:
    """Return a root sampler that drops client spans with no parent, and asks `inner` else."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class NoOrphanClients(Sampler):
        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            if kind == SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            return inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"NoOrphanClients{{{inner.get_description()}}}"

    return NoOrphanClients()


def instrument_flask(app: Flask, settings: Settings) -> None:
    """Trace the app's requests (continuing a caller's `traceparent`), if tracing is on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor().instrument_app(  # type: ignore[no-untyped-call]
        app, tracer_provider=_provider, excluded_urls=settings.otel_excluded_urls
    )


def _tracer() -> trace.Tracer:
    assert _provider is not None
    return _provider.get_tracer(TRACER)


# What `span` and `publishing` return while tracing is off: nothing to build per call.
_OFF = contextlib.nullcontext()


def span(
    name: str,
    attributes: Mapping[str, str | int] | None = None,
    *,
    root: bool = False,
    kind: SpanKind = SpanKind.INTERNAL,
) -> contextlib.AbstractContextManager[None]:
    """Run the block in a span of Conveyor's own (a no-op when not tracing).

    `root` starts a new trace whatever span is current. An exception marks the span as an
    error by its type alone: a message may quote a payload, so it is not recorded.
    """
    if _provider is None:
        return _OFF
    return _span(name, attributes, root=root, kind=kind)


@contextlib.contextmanager
def _span(
    name: str,
    attributes: Mapping[str, str | int] | None,
    *,
    root: bool,
    kind: SpanKind,
) -> Iterator[None]:
    context = Context() if root else None
    with _tracer().start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield
        except BaseException as exc:
            current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


def annotate(attributes: Mapping[str, str | int]) -> None:
    """Add attributes to the current span (a no-op when not tracing)."""
    if _provider is not None:
        trace.get_current_span().set_attributes(attributes)


@contextlib.contextmanager
def outbound_span(method: str, url: str, headers: MutableMapping[str, str]) -> Iterator[None]:
    """Run an outbound HTTP call in a client span, and add its `traceparent` to `headers`.

    The URL is recorded without its credentials, query or fragment: a callback URL may
    carry a token there.
    """
    if _provider is None:
        yield
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.full": f"{parts.scheme}://{host}:{port}{parts.path or '/'}",
        "server.address": host,
        "server.port": port,
    }
    with span(method, attributes, kind=SpanKind.CLIENT):
        inject(headers)
        yield


def current_trace_context() -> dict[str, str] | None:
    """Return the W3C headers of the current span, stored with a job it submits; None if none."""
    if _provider is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    inject(carrier)
    return {k: v for k, v in carrier.items() if k in ("traceparent", "tracestate")} or None


def trace_id_of(trace_context: Mapping[str, str] | None) -> str | None:
    """Return the 32 hex digits of the trace a stored context belongs to, or None."""
    if not trace_context:
        return None
    parts = str(trace_context.get("traceparent", "")).split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def publishing(count: int, queues: Sequence[str]) -> contextlib.AbstractContextManager[None]:
    """Run a publish of `count` job messages in a producer span (a no-op when not tracing)."""
    if _provider is None:
        return _OFF
    return _publishing(count, queues)


@contextlib.contextmanager
def _publishing(count: int, queues: Sequence[str]) -> Iterator[None]:
    attributes: dict[str, str | int] = {
        "messaging.system": "celery",
        "messaging.operation": "publish",
        "messaging.batch.message_count": count,
        "messaging.destination.name": ",".join(sorted(set(queues))),
    }
    with _tracer().start_as_current_span(
        "conveyor.publish", kind=SpanKind.PRODUCER, attributes=attributes
    ):
        yield


def message_headers(
    headers: MutableMapping[str, str],
    job_id: str,
    job_type: str,
    trace_context: Mapping[str, str] | None,
) -> None:
    """Add the trace a job's message carries to the worker to `headers`.

    A job published in the trace that submitted it (at its submit) continues that trace.
    One published later (by the dispatcher, the promoter, a retry's backoff, a schedule's
    fire) starts a trace of its own, with a `conveyor.dispatch` span linked to the one that
    submitted it. A job submitted untraced carries nothing: its run starts its own trace.
    """
    if _provider is None or not trace_context:
        return
    cause = trace.get_current_span(extract(trace_context)).get_span_context()
    current = trace.get_current_span().get_span_context()
    if current.is_valid and current.trace_id == cause.trace_id:
        inject(headers)
        return
    dispatch = _tracer().start_span(
        "conveyor.dispatch",
        context=Context(),
        kind=SpanKind.PRODUCER,
        links=[Link(cause)] if cause.is_valid else None,
        attributes={JOB_ID: job_id, JOB_TYPE: job_type},
    )
    dispatch.end()
    inject(headers, context=trace.set_span_in_context(dispatch))


def add_trace_ids(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add `trace_id` and `span_id` to a log line written inside a traced request or job."""
    if _provider is None:
        return event_dict
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict
