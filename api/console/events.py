"""The console's live updates: each page listens to an event stream and refreshes its live part.

The same streams as the API's (`api.streams`), for the signed-in user's tenant: a job page
listens to its job (transitions and progress) until it finishes, every other live page to
the tenant's transitions. static/console.js refreshes the page's live part on each event,
and falls back to its timer only while no stream is open.
"""

from __future__ import annotations

from werkzeug.wrappers import Response

from api.console.base import bp, needs
from api.requests import parse_id
from api.streams import open_job_stream, open_tenant_stream
from conveyor.auth.roles import Permission
from conveyor.ledger.reads import JobFilter


@bp.get("/events")
@needs(Permission.READ)
def events() -> Response:
    """Stream the tenant's transitions to a console page (text/event-stream)."""
    return open_tenant_stream(JobFilter(), None)


@bp.get("/jobs/<job_id>/events")
@needs(Permission.READ)
def job_events(job_id: str) -> Response:
    """Stream one job's transitions and progress to its console page until it finishes."""
    return open_job_stream(parse_id(job_id, "job"), None)
