"""Rate limits, counted in Redis and shared by every API instance.

- Every endpoint group (`endpoint_group`) has a rate limit per client IP, counted before
  anything else, and one per verified principal (API key or user), counted once the caller
  is authenticated, so nobody can pick a bucket with a made-up token.
- Sign-in and sign-up are limited per client IP and per email instead.

The counters are fixed windows (api/rate_windows.py) whose increment also answers its count
and expiry, so the `X-RateLimit-*` headers and a 429's `Retry-After` cost no Redis round
trip of their own. A caller the API-key cache already vouches for is counted per IP and per
principal in one round trip; anyone else per IP first, then, once verified, per principal.
When the counters share the snapshots' Redis, that round trip also reads the status poll's
job snapshot, and an admitted poll's view uses it (`prefetched_snapshot`) instead of
reading again; a refused one never gets it.
When Redis is unreachable, rate limiting steps aside for a few seconds (fail open) with one
warning, and responses carry no rate-limit headers rather than made-up ones.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from flask import Blueprint, Flask, Response, g, request
from limits import RateLimitItem
from redis import Redis
from redis.exceptions import RedisError

from api.auth import authenticate, cached_principal
from api.rate_windows import Counter, RateWindows, Window, parse_limits
from api.services import services
from conveyor.auth import Principal
from conveyor.errors import RateLimited, Unauthorized
from conveyor.identity import normalise_email
from conveyor.live.store import Prefetched, queue_read
from conveyor.settings import Settings

logger = logging.getLogger(__name__)
GROUPS = ("submit", "read", "control", "admin")
# Probes and metrics are never limited; sign-in and sign-up have limits of their own.
UNGROUPED = frozenset({"health", "metrics", "signin", "docs"})
# Writes by blueprint; every other write (keys, users, webhooks, schedules, sessions) is admin.
WRITE_GROUPS = {"jobs": "submit", "files": "submit", "job_control": "control"}
# Endpoints whose blueprint and method do not tell their group.
ENDPOINT_GROUPS = {"schedules.trigger": "control"}
READ_METHODS = frozenset({"GET", "HEAD"})
# After Redis fails, rate limiting stays off this long before trying Redis again.
OUTAGE_SECONDS = 5.0
HEADER_LIMIT = "X-RateLimit-Limit"
HEADER_REMAINING = "X-RateLimit-Remaining"
HEADER_RESET = "X-RateLimit-Reset"
# What a limit counts by, from the prefix of its key, for the 429's detail.
_COUNTED_BY = {"ip": "client IP", "key": "API key", "user": "user", "email": "email address"}
# The window the headers describe, as this request's hits left it.
_SHOWN = "rate_limit_window"
# The status poll, whose job snapshot is read with its counters when they share a Redis.
POLL_ENDPOINT = "jobs.show"
# The poll's snapshot as the counters' round trip read it, for the view.
_PREFETCHED = "prefetched_snapshot"


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
    # As Flask-Limiter's get_remote_address: a peer without an address is the loopback.
    peer = request.remote_addr or "127.0.0.1"
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


def prefetched_snapshot() -> Prefetched | None:
    """Return the job snapshot read with this admitted poll's counters, if it was."""
    reply: Prefetched | None = g.pop(_PREFETCHED, None)
    return reply


def _polled_job() -> uuid.UUID | None:
    """Return the job this request polls, or None when it is no poll (or a malformed id)."""
    if request.endpoint != POLL_ENDPOINT or not request.view_args:
        return None
    try:
        return uuid.UUID(str(request.view_args.get("job_id")))
    except ValueError:
        return None  # the view answers 404


def principal_key(principal: Principal) -> str:
    """Key a request by its verified principal: the API key, else the signed-in user."""
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

    def report(self, error: Exception) -> None:
        """Turn rate limiting off for a while, saying so once per outage."""
        if not self.active():
            logger.warning(
                "rate limiting is off for %.0fs: its Redis is unavailable (%s: %s)",
                self._seconds,
                type(error).__name__,
                error,
            )
        self._until = self._clock() + self._seconds


def breach_error(window: Window) -> RateLimited:
    """Describe a breached window as a `RateLimited` error with its `Retry-After`."""
    counted = window.counter.who.partition(":")[0]
    who = _COUNTED_BY.get(counted, "client")
    group = _group()
    what = f"{group} requests" if group else "requests here"
    retry_after = window.retry_after
    return RateLimited(
        f"too many {what} from this {who}: the limit is {window.counter.item}; "
        f"retry in {retry_after}s",
        retry_after=retry_after,
    )


class _Limits:
    """Counts a request's windows, notes the one its headers describe, refuses on a breach."""

    def __init__(self, windows: RateWindows, outage: _Outage, prefix: str) -> None:
        self._windows = windows
        self._outage = outage
        self._prefix = prefix

    def counters(self, items: Sequence[RateLimitItem], who: str, scope: str) -> list[Counter]:
        """Return the counters of `items` for `who` in `scope`."""
        prefix = self._prefix
        return [Counter.of(item, prefix, who, scope) for item in items]

    def count(
        self, counters: Sequence[Counter], shown: int = 0, snapshot_of: uuid.UUID | None = None
    ) -> None:
        """Count the request in one round trip; without a breach the headers show `shown`.

        With `snapshot_of`, that round trip reads the job's snapshot too, handed to the view
        only when the request is admitted. Raises `RateLimited` at the first breached window
        (the later ones are not counted); when Redis fails, starts an outage and lets the
        request through, without headers (the view then reads the snapshot itself).
        """
        replies = None
        try:
            if snapshot_of is None:
                windows = self._windows.hit(counters)
            else:
                read = functools.partial(queue_read, job_id=snapshot_of)
                windows, replies = self._windows.hit_along(counters, read)
        except RedisError as exc:
            self._outage.report(exc)
            g.pop(_SHOWN, None)
            return
        last = windows[-1]
        if last.breached:
            setattr(g, _SHOWN, last)
            raise breach_error(last)
        setattr(g, _SHOWN, windows[shown])
        if snapshot_of is not None and replies is not None:
            setattr(g, _PREFETCHED, Prefetched(snapshot_of, replies))


def _add_headers(outage: _Outage) -> Callable[[Response], Response]:
    def add_headers(response: Response) -> Response:
        # The principal's limit when it was counted, else the client IP's, as the hit's own
        # reply left it; left out when Redis could not say: no header is better than a guess.
        window: Window | None = g.get(_SHOWN)
        if window is None or outage.active():
            return response
        response.headers[HEADER_LIMIT] = str(window.counter.item.amount)
        response.headers[HEADER_REMAINING] = str(window.remaining)
        response.headers[HEADER_RESET] = str(math.ceil(window.reset))
        return response

    return add_headers


def init_app(app: Flask, settings: Settings, throttled: Blueprint) -> None:
    """Limit every endpoint group per IP and per principal, `throttled` per IP and email."""
    ip_limits: Mapping[str, tuple[RateLimitItem, ...]] = {
        group: parse_limits(getattr(settings, f"rate_limit_{group}_ip")) for group in GROUPS
    }
    principal_limits: Mapping[str, tuple[RateLimitItem, ...]] = {
        group: parse_limits(getattr(settings, f"rate_limit_{group}_principal")) for group in GROUPS
    }
    signin_ip = parse_limits(settings.auth_rate_limit_ip)
    signin_email = parse_limits(settings.auth_rate_limit_email)
    outage = _Outage(OUTAGE_SECONDS)
    # Its own client with short timeouts: a Redis that hangs must not hold requests long.
    redis = Redis.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=1, socket_timeout=1
    )
    limits = _Limits(RateWindows(redis), outage, settings.rate_limit_prefix)
    # On the snapshots' Redis, the poll's counters carry its snapshot read (else two trips).
    prefetch_polls = settings.redis_url.get_secret_value() == settings.result_backend

    def counting() -> bool:
        return settings.rate_limits_enabled and not outage.active()

    def admit_signin() -> None:
        # Per route, by IP and by email, shortest window first: as Flask-Limiter counted a
        # blueprint's limits.
        scope = request.endpoint or ""
        counters = sorted(
            [
                *limits.counters(signin_ip, ip_key(), scope),
                *limits.counters(signin_email, email_key(), scope),
            ],
            key=lambda counter: counter.item.GRANULARITY.seconds,
        )
        if counters:
            limits.count(counters)

    @app.before_request
    def _admit() -> None:
        group = _group()
        if group is None:
            if request.blueprint == throttled.name and counting():
                admit_signin()
            return
        by_ip, by_principal = ip_limits[group], principal_limits[group]
        principal = None
        if counting():
            counters = limits.counters(by_ip, ip_key(), f"ip-{group}")
            # A caller known without a lookup is counted per IP and per principal at once;
            # the IP's windows come first, so a refused IP spends none of the principal's.
            principal = cached_principal() if by_principal else None
            shown, polled = 0, None
            if principal is not None:
                shown = len(counters)
                counters += limits.counters(
                    by_principal, principal_key(principal), f"principal-{group}"
                )
                polled = _polled_job() if prefetch_polls else None
            if counters:
                limits.count(counters, shown, polled)
        if principal is None and settings.rate_limits_enabled and by_principal:
            principal = _verified_principal()
            if principal is None:
                return
            if by_principal and counting():
                limits.count(
                    limits.counters(by_principal, principal_key(principal), f"principal-{group}")
                )

    if settings.rate_limit_headers:
        app.after_request(_add_headers(outage))
