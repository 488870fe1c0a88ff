"""`make bench`'s tracing measure: Conveyor's submit and end to end with tracing on and off.

A second Conveyor api and worker, on a queue of their own, export every span over OTLP/HTTP
to a stub collector in this process (it answers 200 and counts; it decodes nothing while
measuring). Rounds alternate off and on, so machine noise hits both alike. At the end one
job, submitted with a known `traceparent`, is kept and printed as a tree: the sample trace.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

from bench.loadgen import LoadResult, post_json
from bench.processes import start, stop, wait_http, wait_worker_ready
from devtools.embedded import free_port

# The trace the sample job is submitted in (a caller's traceparent, continued).
SAMPLE_TRACE = "5ca1ab1e000000000000000000c0ffee"
SAMPLE_PARENT = "00000000000000aa"


class CollectorStub:
    """An OTLP/HTTP trace receiver on 127.0.0.1: answers 200, counts, keeps bodies on demand."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.keep = False
        self.bodies: list[bytes] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests += 1
                stub.bytes += len(body)
                if stub.keep:
                    stub.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """Return the base URL exporters are given (OTEL_EXPORTER_OTLP_ENDPOINT)."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> CollectorStub:
        """Start serving."""
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def spans_of(self, trace_id: str) -> list[dict[str, Any]]:
        """Decode the kept bodies; return the spans of one trace, with their service."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        found = []
        for body in self.bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource.resource.attributes
                        if a.key == "service.name"
                    ),
                    "?",
                )
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        if span.trace_id.hex() != trace_id:
                            continue
                        found.append(
                            {
                                "service": service,
                                "name": span.name,
                                "id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "start": span.start_time_unix_nano,
                                "ms": (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
                                "attributes": {
                                    a.key: _value(a.value)
                                    for a in span.attributes
                                    if a.key.startswith(("conveyor.", "db.", "http", "messaging"))
                                },
                            }
                        )
        return found


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def render(spans: list[dict[str, Any]]) -> str:
    """Render a trace's spans as an indented tree, children by start time."""
    ids = {s["id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        parent = span["parent"] if span["parent"] in ids else ""
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s["start"]):
            attributes = " ".join(
                f"{k}={_short(v)}" for k, v in sorted(span["attributes"].items()) if k in SHOWN
            )
            lines.append(
                f"{'  ' * depth}{span['name']} [{span['service']}] {span['ms']:.2f} ms"
                + (f"  {attributes}" if attributes else "")
            )
            walk(span["id"], depth + 1)

    walk("", 0)
    return "\n".join(lines)


# The attributes the sample shows (statements cut short, whitespace folded).
SHOWN = {
    "conveyor.job.id",
    "conveyor.job.type",
    "conveyor.job.outcome",
    "db.statement",
    "http.route",
    "http.status_code",
    "messaging.destination.name",
    "messaging.batch.message_count",
}


def _short(value: Any, limit: int = 60) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def traced_copy(stack: Any, endpoint: str) -> Any:
    """Return the stack's twin that exports its spans to `endpoint`, on a queue of its own."""
    port = free_port()
    queue = "bench-traced"
    env = {
        **stack.env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "CONVEYOR_DEFAULT_QUEUE": queue,
    }
    api_cmd = [f"127.0.0.1:{port}" if a == f"127.0.0.1:{stack.port}" else a for a in stack.api_cmd]
    return dataclasses.replace(
        stack,
        name="conveyor-traced",
        env=env,
        port=port,
        api_cmd=api_cmd,
        queue=queue,
        api=None,
        worker=None,
        beat=None,
        beat_cmd=None,
    )


def tracing_rounds(
    stack: Any,
    r: redis.Redis,
    args: Any,
    measure: dict[str, Callable[..., Any]],
) -> tuple[dict[str, list[float]], str]:
    """Measure submit and end to end with tracing off (`stack`) and on (its traced twin).

    `measure` holds run.py's `load`, `end_to_end` and `drain_queue`. Returns the rounds and
    the sample trace as text.
    """
    out: dict[str, list[float]] = {}
    modes = {"off": stack}
    logs = Path(stack.env["BENCH_LOGS"])
    with CollectorStub() as collector:
        traced = traced_copy(stack, collector.endpoint)
        modes["on"] = traced
        stop(stack.worker)
        stack.worker = None
        # Both modes start from an empty ledger and queues (earlier phases leave backlogs,
        # and a deep queue makes submits wait for the dispatcher instead of publishing).
        stack.ledger.forget_jobs()
        for target in modes.values():
            measure["drain_queue"](r, target.queue)
        try:
            traced.api = start(traced.api_cmd, traced.env, logs / "traced-api.log")
            wait_http(traced.port)
            post_json(traced.port, traced.submit_path, traced.job_body, traced.headers)
            measure["load"](traced, "POST", [traced.submit_path], traced.job_body, 1.0)
            for _ in range(args.rounds):
                for mode, target in modes.items():
                    res: LoadResult = measure["load"](
                        target, "POST", [target.submit_path], target.job_body, args.seconds
                    )
                    out.setdefault(f"tracing_{mode}_submit_rps", []).append(res.rps)
                    out.setdefault(f"tracing_{mode}_submit_p50_ms", []).append(res.p50_ms)
                    out.setdefault(f"tracing_{mode}_submit_p99_ms", []).append(res.p99_ms)
            # The submits' jobs never ran: start end to end on an empty ledger and queues.
            stack.ledger.forget_jobs()
            for target in modes.values():
                measure["drain_queue"](r, target.queue)
                wlog = logs / f"{target.name}-worker.log"
                offset = wlog.stat().st_size if wlog.exists() else 0
                target.worker = start(target.worker_cmd, target.env, wlog)
                wait_worker_ready(wlog, offset)
            for _ in range(args.rounds):
                for mode, target in modes.items():
                    rate = measure["end_to_end"](target, args.e2e, 180)
                    out.setdefault(f"tracing_{mode}_e2e_jobs_per_s", []).append(rate)
            for kind in ("submit_rps", "e2e_jobs_per_s"):
                on, off = out[f"tracing_on_{kind}"], out[f"tracing_off_{kind}"]
                out[f"tracing_{kind}_ratio"] = [a / b for a, b in zip(on, off, strict=True)]
            out["tracing_otlp_requests"] = [float(collector.requests)]
            out["tracing_otlp_mb"] = [collector.bytes / 2**20]
            sample = _sample(traced, collector)
        finally:
            stop(traced.worker)
            stop(traced.api)
    return out, sample


def _sample(traced: Any, collector: CollectorStub) -> str:
    """Run one job in a known trace and return its spans, as exported, as a tree."""
    collector.keep = True
    headers = {**traced.headers, "traceparent": f"00-{SAMPLE_TRACE}-{SAMPLE_PARENT}-01"}
    job = post_json(traced.port, traced.submit_path, traced.job_body, headers)
    # The batch processors export every 5 s: wait for the worker's run span to arrive.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = collector.spans_of(SAMPLE_TRACE)
        if any(s["name"].startswith("run/") for s in spans) and any(
            s["name"].startswith("POST") for s in spans
        ):
            time.sleep(1)  # the last batch of either process
            return f"job {job['id']}\n" + render(collector.spans_of(SAMPLE_TRACE))
        time.sleep(0.5)
    return f"job {job['id']}: no complete trace within 30 s"
