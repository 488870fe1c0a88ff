"""A typed Python client for Conveyor's HTTP API (httpx); errors arrive as exceptions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})


class ApiError(Exception):
    """Raised for a problem+json answer; carries its status, title, detail and field errors."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.errors: list[dict[str, str]] = problem.get("errors", [])
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}")


class NotFoundError(ApiError):
    """Raised for 404: no such object in your tenant."""


class AuthError(ApiError):
    """Raised for 401 and 403."""


class ConflictError(ApiError):
    """Raised for 409: a state or an idempotency key does not allow it."""


class ValidationError(ApiError):
    """Raised for 400, 413, 415 and 422: the request was wrong; `errors` names the fields."""


class RateLimited(ApiError):
    """Raised for 429; `retry_after` says when to try again."""

    retry_after: float = 0.0


_ERRORS: dict[int, type[ApiError]] = {
    400: ValidationError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,
    415: ValidationError,
    422: ValidationError,
    429: RateLimited,
}


def _raise_for_problem(response: httpx.Response) -> None:
    """Raise the `ApiError` of a problem+json answer (any status from 400)."""
    if response.status_code < 400:
        return
    problem = response.json() if "json" in response.headers.get("content-type", "") else {}
    error = _ERRORS.get(response.status_code, ApiError)(response.status_code, problem)
    if isinstance(error, RateLimited):
        error.retry_after = float(response.headers.get("Retry-After", "1"))
    raise error


class Client:
    """Conveyor's API: jobs, schedules and keys, with `Authorization: Bearer <key>`."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        # Imported here: httpx costs a quarter second, which `conveyor --help` need not pay.
        import httpx

        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        """Use the client as a context manager."""
        return self

    def __exit__(self, *_: object) -> None:
        """Close on leaving the block."""
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for_problem(response)
        return response.json() if response.content else None

    def submit(
        self,
        job_type: str,
        payload: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Submit a job (options: priority, queue, run_at, delay_seconds, ttl_seconds, tags, …)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"type": job_type, "payload": payload or {}, **options}
        job: dict[str, Any] = self._call("POST", "/v1/jobs", json=body, headers=headers)
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        """Return a job."""
        job: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return job

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 300.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Wait for the job to finish, calling `on_update` at each change; raise `TimeoutError`.

        Follows the job's event stream, so each transition and progress report arrives as it
        happens; if the stream is unavailable or breaks, long-polls (`?wait=`) instead.
        """
        import httpx

        deadline = time.monotonic() + timeout
        try:
            job = self._follow_stream(job_id, deadline, on_update)
        except (httpx.HTTPError, ApiError, ValueError):
            job = None  # a proxy that cuts streams, an older server: the long poll still works
        if job is not None:
            return job
        return self._long_poll(job_id, deadline, on_update)

    def events(
        self, job_id: str, *, last_event_id: int | None = None, read_timeout: float = 60.0
    ) -> Iterator[tuple[str, int | None, dict[str, Any]]]:
        """Yield a job's stream as (event, id, job view) until it finishes (SSE, resumable)."""
        import httpx

        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        # Heartbeats arrive every 15 s: a read that waits longer means a dead connection.
        timeout = httpx.Timeout(10.0, read=read_timeout)
        with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/stream", headers=headers, timeout=timeout
        ) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_problem(response)
            kind, event_id, data = "message", None, ""
            for line in response.iter_lines():
                if line == "":
                    if data:
                        yield kind, event_id, json.loads(data)
                    kind, event_id, data = "message", None, ""
                elif line.startswith(":"):
                    yield "ping", event_id, {}
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "event":
                        kind = value
                    elif name == "id":
                        event_id = int(value)
                    elif name == "data":
                        data += value

    def _follow_stream(
        self,
        job_id: str,
        deadline: float,
        on_update: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any] | None:
        """Return the finished job from its stream, or None if the stream ended before that."""
        for kind, _, job in self.events(job_id):
            if kind in ("state", "progress"):
                if on_update is not None:
                    on_update(job)
                if kind == "state" and job["state"] in TERMINAL:
                    return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} unfinished after the wait")
        return None

    def _long_poll(
        self,
        job_id: str,
        deadline: float,
        on_update: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        """Return the finished job, asking the API to hold each poll until the job changes."""
        etag: str | None = None
        while True:
            left = deadline - time.monotonic()
            hold = max(0, min(30, int(left)))
            headers = {"If-None-Match": etag} if etag else {}
            params = {"wait": hold} if etag and hold else {}
            response = self._http.get(
                f"/v1/jobs/{job_id}", params=params, headers=headers, timeout=hold + 10.0
            )
            if response.status_code != 304:
                _raise_for_problem(response)
                job: dict[str, Any] = response.json()
                etag = response.headers.get("ETag")
                if on_update is not None:
                    on_update(job)
                if job["state"] in TERMINAL:
                    return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} unfinished after the wait")
            if not etag:
                time.sleep(min(1.0, max(0.0, left)))  # a server without ETags: plain polls

    def jobs(self, *, limit: int = 50, **filters: str) -> Iterator[dict[str, Any]]:
        """Iterate over jobs matching the filters, newest first, fetching page by page."""
        params: dict[str, Any] = {"limit": limit, **filters}
        while True:
            page = self._call("GET", "/v1/jobs", params=params)
            yield from page["items"]
            if not page["next_cursor"]:
                return
            params["cursor"] = page["next_cursor"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a waiting job, or ask a running one to stop."""
        answer: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return answer

    def retry(self, job_id: str) -> dict[str, Any]:
        """Run a failed, cancelled or expired job again."""
        job: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/retry")
        return job

    def submit_workflow(
        self, name: str, jobs: list[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a workflow: jobs with a `ref` each and `depends_on` naming other refs."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"name": name, "jobs": jobs}
        workflow: dict[str, Any] = self._call("POST", "/v1/workflows", json=body, headers=headers)
        return workflow

    def workflow(self, workflow_id: str) -> dict[str, Any]:
        """Return a workflow with every job, its state and its dependencies."""
        workflow: dict[str, Any] = self._call("GET", f"/v1/workflows/{workflow_id}")
        return workflow

    def workflows(self, *, limit: int = 50, **filters: str) -> Iterator[dict[str, Any]]:
        """Iterate over workflows (filters: state, name), newest first, page by page."""
        params: dict[str, Any] = {"limit": limit, **filters}
        while True:
            page = self._call("GET", "/v1/workflows", params=params)
            yield from page["items"]
            if not page["next_cursor"]:
                return
            params["cursor"] = page["next_cursor"]

    def cancel_workflow(self, workflow_id: str) -> dict[str, Any]:
        """Cancel every unfinished job of a workflow."""
        workflow: dict[str, Any] = self._call("POST", f"/v1/workflows/{workflow_id}/cancel")
        return workflow

    def wait_workflow(self, workflow_id: str, *, timeout: float = 300.0) -> dict[str, Any]:
        """Poll until the workflow finishes, backing off from 0.1 s to 2 s; raise `TimeoutError`."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            workflow = self.workflow(workflow_id)
            if workflow["state"] != "running":
                return workflow
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"workflow {workflow_id} still running after {timeout}s")
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)

    def list_schedules(self) -> list[dict[str, Any]]:
        """List schedules."""
        items: list[dict[str, Any]] = self._call("GET", "/v1/schedules")["items"]
        return items

    def create_schedule(self, **schedule: Any) -> dict[str, Any]:
        """Create a schedule (name, job_type, payload, cron/timezone or interval_seconds, …)."""
        created: dict[str, Any] = self._call("POST", "/v1/schedules", json=schedule)
        return created

    def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule."""
        self._call("DELETE", f"/v1/schedules/{schedule_id}")

    def list_keys(self) -> list[dict[str, Any]]:
        """List API keys (without secrets)."""
        items: list[dict[str, Any]] = self._call("GET", "/v1/api-keys")["items"]
        return items

    def create_key(self, name: str, role: str) -> dict[str, Any]:
        """Create an API key; its secret is in the answer, once."""
        created: dict[str, Any] = self._call(
            "POST", "/v1/api-keys", json={"name": name, "role": role}
        )
        return created

    def revoke_key(self, key_id: str) -> None:
        """Revoke an API key."""
        self._call("DELETE", f"/v1/api-keys/{key_id}")

    def set_limit(
        self, key: str, *, max_running: int | None = None, per_second: float | None = None
    ) -> dict[str, Any]:
        """Create or change a limit (a running cap, a rate, or both)."""
        body = {"max_running": max_running, "per_second": per_second}
        limit: dict[str, Any] = self._call(
            "PUT", f"/v1/limits/{key}", json={k: v for k, v in body.items() if v is not None}
        )
        return limit

    def get_limit(self, key: str) -> dict[str, Any]:
        """Return a limit with the jobs it holds now (`running`, `waiting`)."""
        limit: dict[str, Any] = self._call("GET", f"/v1/limits/{key}")
        return limit

    def list_limits(self) -> list[dict[str, Any]]:
        """List the tenant's limits."""
        items: list[dict[str, Any]] = self._call("GET", "/v1/limits")["items"]
        return items

    def delete_limit(self, key: str) -> None:
        """Remove a limit: its jobs run unlimited."""
        self._call("DELETE", f"/v1/limits/{key}")

    def pause_queue(self, queue: str) -> dict[str, Any]:
        """Hold the tenant's jobs in a queue until resumed (running ones finish)."""
        answer: dict[str, Any] = self._call("POST", f"/v1/queues/{queue}/pause")
        return answer

    def resume_queue(self, queue: str) -> dict[str, Any]:
        """Let the tenant's jobs in a queue start again."""
        answer: dict[str, Any] = self._call("POST", f"/v1/queues/{queue}/resume")
        return answer

    def queues(self) -> dict[str, Any]:
        """Return the queues (depth, the tenant's queued and running jobs, paused) and workers."""
        overview: dict[str, Any] = self._call("GET", "/v1/queues")
        return overview
