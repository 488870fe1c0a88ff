"""Live status: a job's event stream, a tenant's event stream (SSE), and the long poll's wait.

Every change comes from a committed transition (`conveyor.live.events`: published after the
unit of work commits). A stream subscribes to this process's hub BEFORE it reads the ledger,
so nothing committed in between is missed; whenever it may have missed something (the hub
reconnected, its buffer overflowed, Redis is down) it reads `job_events` after the last id it
sent. An idle stream costs a greenlet of the gevent worker, not a request worker
(bench/README.md, "Live status").
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterator

from flask import Response, request
from pydantic import ConfigDict, Field
from redis.exceptions import RedisError
from sqlalchemy.engine import RowMapping

from api.auth import current_principal, requires
from api.job_views import View, shown_to_caller
from api.openapi import QueryModel, responses, secured_blueprint
from api.requests import parse_id
from api.schemas import JobPath
from api.services import Services, services
from conveyor.auth.roles import Permission
from conveyor.errors import NotFound, ValidationFailed
from conveyor.ledger.reads import (
    JobFilter,
    job_events_after,
    job_row,
    latest_event_id,
    newest_event_id,
    tenant_events_after,
    with_started,
)
from conveyor.ledger.states import FINISHED, JobState
from conveyor.ledger.views import job_view
from conveyor.live.events import Change, Hub, Subscription

bp = secured_blueprint(
    "streams", __name__, "jobs", "/v1", "A job's or a tenant's transitions as they commit."
)
# A comment line this often keeps proxies from closing an idle stream, and shows the server
# a client that left (a write to a closed connection fails).
HEARTBEAT_SECONDS = 15.0
# While the hub is down, streams and long polls read the ledger this often.
FALLBACK_SECONDS = 1.0
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers responses unless told not to; an event would wait for the buffer.
    "X-Accel-Buffering": "no",
}
# A stream's first frame, sent once it listens: a reconnecting EventSource waits this long
# (ms) before it resumes.
RETRY = "retry: 1000\n\n"
EVENT_STREAM = {
    "description": "`text/event-stream`: `event: state` or `event: progress`, `id:` the job "
    "event's id, `data:` the job's view; `: ping` comments while idle.",
    # The schema of one event (how OpenAPI 3.1 tools such as Schemathesis read a stream's).
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "properties": {
                    "event": {"type": "string", "enum": ["state", "progress"]},
                    "id": {"type": "string"},
                    "data": {"type": "string", "description": "the job's view, as JSON"},
                },
                "required": ["event", "id", "data"],
            }
        }
    },
}


class EventStreamQuery(QueryModel):
    """`GET /v1/events/stream`: the job list's filters, and where to resume."""

    model_config = ConfigDict(extra="forbid")
    state: JobState | None = None
    type: str | None = Field(default=None, max_length=200)
    queue: str | None = Field(default=None, max_length=100)
    tag: str | None = Field(default=None, max_length=64)
    # For clients that cannot send the Last-Event-ID header (curl can: -H).
    last_event_id: int | None = Field(default=None, ge=0)

    def filters(self) -> JobFilter:
        """Return the filter the transitions must match."""
        return JobFilter(state=self.state, type=self.type, queue=self.queue, tag=self.tag)


class JobStreamQuery(QueryModel):
    """`GET /v1/jobs/{id}/stream`: where to resume."""

    model_config = ConfigDict(extra="forbid")
    last_event_id: int | None = Field(default=None, ge=0)


def frame(kind: str, event_id: int, view: View) -> str:
    """Return one server-sent event."""
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(view, separators=(',', ':'))}\n\n"


def _last_event_id(query_value: int | None) -> int | None:
    """Return where the client resumes: the Last-Event-ID header, else the query's value."""
    header = request.headers.get("Last-Event-ID")
    if header is None or header.strip() == "":
        return query_value
    try:
        value = int(header)
    except ValueError as exc:
        raise ValidationFailed(
            "Last-Event-ID must be an event id this API sent",
            errors=[{"field": "Last-Event-ID", "message": "an integer"}],
        ) from exc
    if value < 0:
        raise ValidationFailed("Last-Event-ID must not be negative")
    return value


def _stream(events: Generator[str]) -> Response:
    """Answer with the stream, subscribed already: its first frame comes once it listens."""
    # Run up to that first frame here, not when the server first reads the body: a change
    # committed after the client has its 200 is then never missed.
    first = next(events)
    return Response(_prefixed(first, events), mimetype="text/event-stream", headers=SSE_HEADERS)


def _prefixed(first: str, rest: Generator[str]) -> Iterator[str]:
    try:
        yield first
        yield from rest
    finally:
        rest.close()  # leaves the subscription even if the body was never read past `first`


@bp.get(
    "/jobs/<job_id>/stream",
    responses=responses({200: EVENT_STREAM}, 404, 422),
)
@requires(Permission.READ)
def job_stream(path: JobPath, query: JobStreamQuery) -> Response:
    """Stream a job's transitions and progress until it finishes; resumes from Last-Event-ID."""
    return open_job_stream(parse_id(path.job_id, "job"), query.last_event_id)


@bp.get("/events/stream", responses=responses({200: EVENT_STREAM}, 422))
@requires(Permission.READ)
def tenant_stream(query: EventStreamQuery) -> Response:
    """Stream the tenant's transitions that match the filters; resumes from Last-Event-ID."""
    return open_tenant_stream(query.filters(), query.last_event_id)


def open_job_stream(job_id: uuid.UUID, last_event_id: int | None) -> Response:
    """Answer with the caller's job's stream (the API's and the console's); 404 for another's."""
    svc = services()
    tenant_id = current_principal().tenant_id
    resume = _last_event_id(last_event_id)
    with svc.work.reading() as session:
        job_row(session, job_id, tenant_id)  # 404 for another tenant's job, before streaming
    return _stream(JobStream(svc, job_id, tenant_id, shown_to_caller()).events(resume))


def open_tenant_stream(filters: JobFilter, last_event_id: int | None) -> Response:
    """Answer with the caller's tenant's stream of matching transitions (API and console)."""
    svc = services()
    resume = _last_event_id(last_event_id)
    stream = TenantStream(svc, current_principal().tenant_id, filters, shown_to_caller())
    return _stream(stream.events(resume))


def _wait(hub: Hub, subscription: Subscription) -> tuple[list[Change], bool]:
    """Return the changes of a heartbeat period, and whether the stream must read the ledger.

    While the hub is down, the period is the fallback's: the ledger is read that often.
    """
    changes = subscription.get(HEARTBEAT_SECONDS if hub.listening else FALLBACK_SECONDS)
    behind = subscription.behind or not hub.listening
    if behind:
        subscription.behind = False
    return changes, behind


class JobStream:
    """One job's events for one client: the ledger's history after an id, then live changes."""

    def __init__(
        self, svc: Services, job_id: uuid.UUID, tenant_id: uuid.UUID, show: Callable[[View], View]
    ) -> None:
        self._svc = svc
        self._job_id = job_id
        self._tenant_id = tenant_id
        self._show = show
        self._last = 0
        # The job row's version this stream has shown (views carry it, each one higher).
        self._version = 0
        self._view: View = {}
        self._done = False

    def events(self, resume: int | None) -> Generator[str]:
        """Yield frames until the job finishes, the client leaves or the server stops."""
        with self._svc.hub.subscribe(job_id=self._job_id) as subscription:
            yield RETRY
            if resume is None:
                yield from self._current()
            else:
                self._last = resume
                yield from self._catch_up()
            while not self._done and not self._svc.hub.closing:
                yield from self._next(subscription)

    def _current(self) -> Iterator[str]:
        """Start a new stream with the job as it is, under its latest event's id."""
        # One snapshot: the row and its latest event must agree (a transition may commit
        # between two autocommit reads).
        with self._svc.work.snapshot() as session:
            row = job_row(session, self._job_id, self._tenant_id)
            self._last = latest_event_id(session, self._job_id) or 0
        self._version = row["version"]
        self._view = self._with_progress(job_view(row))
        self._done = JobState(row["state"]) in FINISHED
        yield frame("state", self._last, self._show(self._view))

    def _next(self, subscription: Subscription) -> Iterator[str]:
        changes, behind = _wait(self._svc.hub, subscription)
        if behind:
            yield from self._catch_up()
        sent = False
        for change in changes:
            if self._done:
                return
            if change.progress is not None:
                if self._view.get("state") == JobState.RUNNING:
                    progress = with_started(change.progress, self._view.get("started_at"))
                    self._view = {**self._view, "progress": progress}
                    sent = True
                    yield frame("progress", self._last, self._show(self._view))
            elif change.version is None or change.version <= self._version:
                continue  # a view already seen (a refill from the ledger, a late duplicate)
            elif change.version == self._version + 1:
                # The next version of the job: nothing can have happened in between, so the
                # message is the change itself (no database read on the hot path).
                sent |= change.event_id is not None
                yield from self._apply(change)
            else:
                # A version skipped: its message was lost or overtaken (a publish may pass
                # an earlier commit's). The ledger has the order and every event.
                sent = True
                yield from self._catch_up()
        if not changes and not sent:
            if self._newer_view():
                # A message lost without the hub noticing: the view moved on without us.
                yield from self._catch_up()
            yield ": ping\n\n"

    def _newer_view(self) -> bool:
        """Return whether the job's live view is newer than what this stream has shown."""
        try:
            version = self._svc.live.version(self._job_id)
        except RedisError:
            return False  # the hub's own fallback reads the ledger while Redis is away
        return version is not None and version > self._version

    def _apply(self, change: Change) -> Iterator[str]:
        """Take the job's next version from its message."""
        self._version = change.version or self._version
        if change.view is None:
            return  # a tombstone: the view is unchanged for clients
        progress = self._view.get("progress") if change.event_id is None else None
        self._view = {**change.view, "progress": progress}
        if change.event_id is None:
            return  # not a transition (a cancel request, a new wait reason): shown next frame
        self._last = change.event_id
        self._done = JobState(change.view["state"]) in FINISHED
        yield frame("state", change.event_id, self._show(self._view))

    def _catch_up(self) -> Iterator[str]:
        """Send the job's events after the last one sent, in id order, from the ledger."""
        # One snapshot: were the row read after a transition the events read missed, its
        # version would mark that transition seen and the stream would never send it.
        with self._svc.work.snapshot() as session:
            events = job_events_after(session, self._job_id, self._last)
            try:
                row = job_row(session, self._job_id, self._tenant_id)
            except NotFound:
                self._done = True  # pruned meanwhile: its events went with it
                return
        self._version = row["version"]
        current = job_view(row)
        for n, event in enumerate(events):
            # A transition read back from the ledger: the job as it is now, in the state
            # the transition moved it to.
            if n == len(events) - 1 and current["state"] == event.to_state:
                self._view = self._with_progress(current)
            else:
                self._view = {**current, "state": JobState(event.to_state).value}
            self._last = event.id
            yield frame("state", event.id, self._show(self._view))
            if JobState(event.to_state) in FINISHED:
                self._done = True
                return

    def _with_progress(self, view: View) -> View:
        if view["state"] != JobState.RUNNING:
            return view
        try:
            progress = self._svc.live.progress(self._job_id)
        except RedisError:  # progress is best effort, as in the poll
            return view
        if progress is None:
            return view
        return {**view, "progress": with_started(progress, view.get("started_at"))}


class TenantStream:
    """A tenant's matching transitions for one client: live, and from the ledger to resume."""

    def __init__(
        self,
        svc: Services,
        tenant_id: uuid.UUID,
        filters: JobFilter,
        show: Callable[[View], View],
    ) -> None:
        self._svc = svc
        self._tenant_id = tenant_id
        self._filters = filters
        self._show = show
        self._last = 0
        # Ids sent lately: a transition read back from the ledger may also arrive live.
        self._sent: deque[int] = deque(maxlen=10_000)

    def events(self, resume: int | None) -> Generator[str]:
        """Yield the stream's frames until the client leaves or the server stops."""
        with self._svc.hub.subscribe(tenant_id=self._tenant_id) as subscription:
            if resume is None:
                with self._svc.work.reading() as session:
                    self._last = newest_event_id(session)
            else:
                self._last = resume
            yield RETRY
            if resume is not None:
                yield from self._catch_up()
            while not self._svc.hub.closing:
                changes, behind = _wait(self._svc.hub, subscription)
                if behind:
                    yield from self._catch_up()
                sent = False
                for change in changes:
                    if change.event_id is None or change.view is None:
                        continue
                    if change.event_id in self._sent or not self._matches(change):
                        continue
                    sent = True
                    yield self._frame(change.event_id, change.view)
                if not changes and not sent:
                    yield ": ping\n\n"

    def _matches(self, change: Change) -> bool:
        view = change.view or {}
        f = self._filters
        return (
            (f.state is None or view.get("state") == f.state)
            and (f.type is None or view.get("type") == f.type)
            and (f.queue is None or view.get("queue") == f.queue)
            and (f.tag is None or f.tag in (view.get("tags") or ()))
        )

    def _catch_up(self) -> Iterator[str]:
        """Send the matching transitions after the last id, page by page, from the ledger."""
        while True:
            with self._svc.work.reading() as session:
                rows = tenant_events_after(session, self._tenant_id, self._last, self._filters)
            for row in rows:
                if row["event_id"] not in self._sent:
                    yield self._frame(row["event_id"], _view_at(row))
            if len(rows) < 500:
                return

    def _frame(self, event_id: int, view: View) -> str:
        self._sent.append(event_id)
        # Live transitions of different jobs may arrive out of id order; resume after the
        # highest.
        self._last = max(self._last, event_id)
        return frame("state", event_id, self._show(view))


def _view_at(row: RowMapping) -> View:
    """Return a transition's job as it is now, in the state the transition moved it to."""
    view = job_view(row)
    view["state"] = JobState(row["to_state"]).value
    return view


def hold(
    svc: Services,
    job_id: uuid.UUID,
    seconds: float,
    etag: Callable[[], tuple[str, Response]],
    known: str,
) -> Response | None:
    """Wait up to `seconds` for the job's view to change from the ETag `known`.

    `etag` reads the view now and returns its ETag and response. Returns the new response,
    or None when nothing changed in time (the caller answers 304).
    """
    deadline = time.monotonic() + seconds
    with svc.hub.subscribe(job_id=job_id) as subscription:
        while True:
            # Read after subscribing: a change committed before the subscription shows here.
            tag, response = etag()
            if tag != known:
                return response
            left = deadline - time.monotonic()
            if left <= 0 or svc.hub.closing:
                return None
            wait = left if svc.hub.listening else min(left, FALLBACK_SECONDS)
            subscription.get(wait)
            subscription.behind = False
