"""`http.request`: call a URL through the outbound guard."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.errors import JobFailed
from conveyor.outbound import request
from conveyor.registry import JobContext, RetryPolicy, job_type
from conveyor.settings import Settings


class HttpRequest(BaseModel):
    """What to send."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str = Field(min_length=8, max_length=2048, pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict, max_length=50)
    json_body: Any = Field(default=None, alias="json")
    timeout: float = Field(default=10.0, gt=0, le=60)


class HttpResult(BaseModel):
    """What came back (the body as text, capped)."""

    status: int
    headers: dict[str, str]
    body: str
    seconds: float


@job_type(
    "http.request",
    payload=HttpRequest,
    result=HttpResult,
    retry=RetryPolicy(max_attempts=3, backoff_base=5.0),
)
def http_request(ctx: JobContext, payload: HttpRequest) -> HttpResult:
    """Send the request; a non-2xx answer fails the attempt (and retries)."""
    settings = ctx.settings or Settings()
    answer = request(
        payload.method,
        payload.url,
        allow_hosts=frozenset(settings.outbound_allow_hosts),
        headers=payload.headers,
        json_body=payload.json_body,
        timeout=payload.timeout,
        max_bytes=settings.outbound_max_bytes,
    )
    if not 200 <= answer.status < 300:
        raise JobFailed(f"{payload.url} answered {answer.status}")
    return HttpResult(
        status=answer.status,
        headers=answer.headers,
        body=answer.body[:65536].decode("utf-8", "replace"),
        seconds=round(answer.seconds, 3),
    )
