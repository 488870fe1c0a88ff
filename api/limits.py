"""Limits and admission control, counted in Redis and shared by every API instance.

- Every endpoint group (`endpoint_group`) has a rate limit per client IP, counted before
  anything else, and one per verified principal (API key or user), counted once the caller
  is authenticated, so nobody can pick a bucket with a made-up token.
- Sign-in and sign-up are limited per client IP and per email instead.
- Submitting jobs is refused while the tenant's unfinished jobs are at their quota.

Each counter's increment also answers its count and expiry (api/rate_windows.py), so the
`X-RateLimit-*` headers and a 429's `Retry-After` cost no Redis round trip of their own.
When Redis is unreachable, rate limiting steps aside for a few seconds (fail open) with one
warning, and responses carry no rate-limit headers rather than made-up ones.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded, RequestLimit
from flask_limiter.util import get_remote_address
from limits.errors import StorageError

from api import rate_windows
from api.auth import authenticate
from api.services import services
from conveyor.auth import Principal
from conveyor.errors import RateLimited, Unauthorized
from conveyor.identity import normalise_email
from conveyor.quota import TenantQuota
from conveyor.roles import PERMISSIONS, Permission
from conveyor.settings import Settings
from conveyor.submit import MAX_BATCH

logger = logging.getLogger(__name__)
GROUPS = ("submit", "read", "control", "admin")
# Probes and metrics are never limited; sign-in and sign-up have limits of their own.
UNGROUPED = frozenset({"health", "metrics", "signin", "docs"})
# Writes by blueprint; every other write (keys, users, webhooks, schedules, sessions) is admin.
WRITE_GROUPS = {"jobs": "submit", "files": "submit", "job_control": "control"}
# Endpoints whose blueprint and method do not tell their group.
ENDPOINT_GROUPS = {"schedules.trigger": "control"}
READ_METHODS = frozenset({"GET", "HEAD"})
# The routes that add jobs against the tenant's quota.
SUBMIT_RULES = frozenset({"/v1/jobs", "/v1/jobs/batch"})
# After Redis fails, rate limiting stays off this long before trying Redis again.
OUTAGE_SECONDS = 5.0
HEADER_LIMIT = "X-RateLimit-Limit"
HEADER_REMAINING = "X-RateLimit-Remaining"
HEADER_RESET = "X-RateLimit-Reset"
# What a limit counts by, from the prefix of its key, for the 429's detail.
_COUNTED_BY = {"ip": "client IP", "key": "API key", "user": "user", "email": "email address"}


def endpoint_group(blueprint: str | None, endpoint: str | None, method: str) -> str | None:
    """Return the limit group of a request (submit, read, control, admin) or None for none."""
    if blueprint is None or blueprint in UNGROUPED or method == "OPTIONS":
        return None
    if endpoint in ENDPOINT_GROUPS:
        return ENDPOINT_GROUPS[endpoint]
    if method in READ_METHODS:
        return "read"
    return WRITE_GROUPS.get(blueprint, "admin")


def _group() -> str | None:
    if "limit_group" not in g:
        g.limit_group = endpoint_group(request.blueprint, request.endpoint, request.method)
    group: str | None = g.limit_group
    return group


def client_ip(trusted_proxies: int) -> str:
    """Return the client's address: the peer's, or the one the outermost trusted proxy saw.

    Each trusted proxy appends the address it received from to `X-Forwarded-For`, so the
    last `trusted_proxies` entries are theirs to vouch for and anything before is hearsay.
    """
    peer = get_remote_address()
    if trusted_proxies <= 0:
        return peer
    forwarded = request.headers.get("X-Forwarded-For", "").split(",")
    chain = [address.strip() for address in forwarded if address.strip()] + [peer]
    return chain[-(trusted_proxies + 1)] if len(chain) > trusted_proxies else chain[0]


def ip_key() -> str:
    """Key a request by its client IP."""
    return f"ip:{client_ip(services().settings.trusted_proxies)}"


def email_key() -> str:
    """Key a request by the email in its JSON body (or its IP when there is none)."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # absurdly deep JSON; the view refuses it
        body = None
    email = body.get("email") if isinstance(body, dict) else None
    return f"email:{normalise_email(email)}" if isinstance(email, str) else ip_key()


def principal_key() -> str:
    """Key a request by its verified principal: the API key, else the signed-in user."""
    principal: Principal = g.principal
    if principal.api_key_id is not None:
        return f"key:{principal.api_key_id}"
    return f"user:{principal.user_id or principal.tenant_id}"


def _verified_principal() -> Principal | None:
    """Authenticate the caller now (the view reuses it), or None when it cannot be."""
    if "Authorization" not in request.headers:
        return None
    try:
        return authenticate()
    except Unauthorized:
        return None  # the view answers 401 if it needs a caller


class _Outage:
    """Remembers that Redis failed, so rate limiting steps aside for a while."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds = seconds
        self._clock = clock
        self._until = 0.0

    def active(self) -> bool:
        """Return whether rate limiting is off because Redis failed lately."""
        return self._clock() < self._until

    def report(self, error: StorageError) -> None:
        """Turn rate limiting off for a while, saying so once per outage."""
        if not self.active():
            cause = error.storage_error
            logger.warning(
                "rate limiting is off for %.0fs: its Redis is unavailable (%s: %s)",
                self._seconds,
                type(cause).__name__,
                cause,
            )
        self._until = self._clock() + self._seconds


class _LimiterLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Flask-Limiter's logger: a swallowed storage error becomes one warning and an outage.

    With `swallow_errors` Flask-Limiter lets a request through when Redis fails and reports
    it only with `logger.exception` (a traceback on every request); this is where we hear it.
    Anything but a storage error (a bug) is still logged with its traceback.
    """

    def __init__(self, outage: _Outage) -> None:
        super().__init__(logging.getLogger("flask-limiter"), {})
        self._outage = outage

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Note a storage outage instead of logging a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, StorageError):
            self._outage.report(error)
        else:
            super().exception(msg, *args, **kwargs)


def _retry_after(limit: RequestLimit) -> int:
    """Return whole seconds until the window of `limit` reopens (as its hit found it)."""
    reset, _ = limit.window
    return max(1, math.ceil(reset - time.time()))


def _note_breach(limit: RequestLimit) -> None:
    """Remember when the breached window reopens, for the 429's `Retry-After`."""
    g.rate_limit_retry_after = _retry_after(limit)


def breach_error(exc: RateLimitExceeded) -> RateLimited:
    """Describe Flask-Limiter's breach as a `RateLimited` error with its `Retry-After`."""
    item = exc.limit.limit
    # Without Redis's word on the window, a whole window is never too soon.
    retry_after = g.pop("rate_limit_retry_after", None) or item.get_expiry()
    counted = str(exc.limit.key_func()).partition(":")[0]
    who = _COUNTED_BY.get(counted, "client")
    group = _group()
    what = f"{group} requests" if group else "requests here"
    return RateLimited(
        f"too many {what} from this {who}: the limit is {item}; retry in {retry_after}s",
        retry_after=int(retry_after),
    )


def _add_headers(limiter: Limiter, outage: _Outage) -> Callable[[Response], Response]:
    def add_headers(response: Response) -> Response:
        # The principal's limit when it was counted, else the client IP's, as the hit's own
        # reply left it; left out when Redis could not say: no header is better than a guess.
        current = limiter.current_limit
        if current is None or outage.active():
            return response
        try:
            reset, remaining = current.window
        except StorageError as exc:
            outage.report(exc)
            return response
        response.headers[HEADER_LIMIT] = str(current.limit.amount)
        response.headers[HEADER_REMAINING] = str(remaining)
        response.headers[HEADER_RESET] = str(math.ceil(reset))
        return response

    return add_headers


def _submitted_jobs() -> int:
    """Return how many jobs this submit adds (0 when the view will refuse the body anyway)."""
    if request.url_rule is None or request.url_rule.rule == "/v1/jobs":
        return 1
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        return 0
    jobs = body.get("jobs") if isinstance(body, dict) else None
    return len(jobs) if isinstance(jobs, list) and len(jobs) <= MAX_BATCH else 0


def init_app(app: Flask, settings: Settings, throttled: Blueprint) -> None:
    """Limit every endpoint group per IP and per principal, `throttled` per IP and email."""
    ip_limits: Mapping[str, str] = {
        group: getattr(settings, f"rate_limit_{group}_ip") for group in GROUPS
    }
    principal_limits: Mapping[str, str] = {
        group: getattr(settings, f"rate_limit_{group}_principal") for group in GROUPS
    }
    outage = _Outage(OUTAGE_SECONDS)
    rate_windows.register()
    limiter = Limiter(
        key_func=ip_key,
        app=app,
        enabled=settings.rate_limits_enabled,
        storage_uri=settings.redis_url,
        # Every storage failure arrives as a StorageError, whatever the backend's driver.
        storage_options={"socket_connect_timeout": 1, "socket_timeout": 1, "wrap_exceptions": True},
        key_prefix=settings.rate_limit_prefix,
        # limits' fixed window, whose hit also returns what the headers need.
        strategy=rate_windows.STRATEGY,
        # Written by `add_headers` below, never from counts Redis did not give.
        headers_enabled=False,
        # A Redis outage must not lock everyone out: let requests through (see _LimiterLog).
        swallow_errors=True,
        on_breach=_note_breach,
        # Counted before authentication, so a flood of bad credentials stops here.
        application_limits=[
            ApplicationLimit(
                lambda: ip_limits.get(_group() or "", ""),
                key_function=ip_key,
                scope=lambda _: f"ip-{_group()}",
            )
        ],
    )
    limiter.logger = _LimiterLog(outage)  # type: ignore[assignment]
    limiter.request_filter(outage.active)
    limiter.limit(settings.auth_rate_limit_ip, key_func=ip_key)(throttled)
    limiter.limit(settings.auth_rate_limit_email, key_func=email_key)(throttled)

    # Flask-Limiter counts a decorated function's limits when it is called: this one is
    # called once the caller is authenticated, so its key is a verified principal.
    @limiter.shared_limit(
        lambda: principal_limits.get(_group() or "", ""),
        scope=lambda _: f"principal-{_group()}",
        key_func=principal_key,
    )
    def count_principal() -> None:
        """Count this request against its principal's limit for its group."""

    quota = TenantQuota(
        settings.tenant_max_unfinished_jobs,
        refresh=settings.tenant_quota_refresh_seconds,
        drain_window=settings.tenant_drain_window_seconds,
    )

    @app.before_request
    def _admit() -> None:
        group = _group()
        if group is None:
            return
        counts_principal = settings.rate_limits_enabled and bool(principal_limits[group])
        submits = (
            quota.limit > 0
            and request.method == "POST"
            and request.url_rule is not None
            and request.url_rule.rule in SUBMIT_RULES
        )
        if not (counts_principal or submits):
            return
        principal = _verified_principal()
        if principal is None:
            return
        if counts_principal and not outage.active():
            count_principal()
        if submits and Permission.SUBMIT in PERMISSIONS[principal.role]:
            quota.admit(services().reads, principal.tenant_id, _submitted_jobs(), datetime.now(UTC))

    if settings.rate_limit_headers:
        app.after_request(_add_headers(limiter, outage))
