"""Rate limits, counted in Redis and shared by every API instance.

- Every endpoint group (`endpoint_group`) has a rate limit per client IP, counted before
  anything else, and one per verified principal (API key or user), counted once the caller
  is authenticated, so nobody can pick a bucket with a made-up token.
- Sign-in and sign-up are limited per client IP and per email instead, and so is each
  sign-in form (the console's: `forms`, counted on POST only).

The counters are fixed windows (api/rate_windows.py) whose increment also answers its count
and expiry, so the `X-RateLimit-*` headers and a 429's `Retry-After` cost no Redis round
trip of their own. A caller the API-key cache already vouches for is counted per IP and per
principal in one round trip; anyone else per IP first, then, once verified, per principal.
An endpoint may send commands of its own in that one round trip (`ride_along`); their
replies reach it only when the request is admitted.
When Redis is unreachable, rate limiting steps aside for a few seconds (fail open) with one
warning, and responses carry no rate-limit headers rather than made-up ones.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from flask.sansio.app import App
from limits import RateLimitItem
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from api.auth import authenticate, cached_principal
from api.rate_leases import Leases
from api.rate_windows import Counter, RateWindows, Window, parse_limits
from api.services import services
from conveyor.auth.identity import normalise_email
from conveyor.auth.keys import Principal
from conveyor.errors import RateLimited, Unauthorized
from conveyor.settings import Settings

logger = logging.getLogger(__name__)
EXTENSION = "conveyor.rate_limits"
GROUPS = ("submit", "read", "control", "admin")
# Probes and metrics are never limited; sign-in and sign-up have limits of their own.
UNGROUPED = frozenset({"health", "metrics", "signin", "docs"})
# Writes by blueprint; every other write (keys, users, webhooks, schedules, sessions) is admin.
WRITE_GROUPS = {"jobs": "submit", "files": "submit", "job_control": "control"}
# Endpoints whose blueprint and method do not tell their group.
ENDPOINT_GROUPS = {
    "schedules.trigger": "control",
    # The console's job actions count as the API's do (api/console/).
    "console.retry": "control",
    "console.cancel": "control",
    "console.bulk": "control",
    "console.schedule_action": "control",
}
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

# Takes the replies to a passenger's commands once the request is admitted.
Receiver = Callable[[Sequence[Any]], None]
# Queues an endpoint's commands on the counters' pipeline and returns their receiver, or
# None when this request has nothing to send (the pipeline then carries only the counters).
Passenger = Callable[[Pipeline], Receiver | None]


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
    # A peer without an address (a test client, a Unix socket) is the loopback.
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
    """Key a request by the email in its JSON body or form (or its IP when there is none)."""
    if request.mimetype == "application/x-www-form-urlencoded":
        email = request.form.get("email")
    else:
        try:
            body = request.get_json(silent=True)
        except RecursionError:  # absurdly deep JSON; the view refuses it
            body = None
        email = body.get("email") if isinstance(body, dict) else None
    return f"email:{normalise_email(email)}" if isinstance(email, str) else ip_key()


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


def same_redis(one: Redis, other: Redis) -> bool:
    """Return whether two clients reach the same Redis database, so one pipeline serves both."""

    def where(client: Redis) -> tuple[Any, ...]:
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        return (
            pool.connection_class,
            kwargs.get("host"),
            kwargs.get("port"),
            kwargs.get("path"),
            kwargs.get("db", 0),
            kwargs.get("username"),
        )

    return where(one) == where(other)


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


@dataclass
class _Limits:
    """Counts a request's windows, notes the one its headers describe, refuses on a breach."""

    windows: RateWindows
    outage: _Outage
    prefix: str
    # Hits leased per process (api/rate_leases.py), for the endpoint groups' limits.
    leases: Leases
    # By endpoint: commands sent with the counters of a caller counted in one round trip.
    passengers: dict[str, Passenger] = field(default_factory=dict)

    def counters(self, items: Sequence[RateLimitItem], who: str, scope: str) -> list[Counter]:
        """Return the counters of `items` for `who` in `scope`."""
        return [Counter.of(item, self.prefix, who, scope) for item in items]

    def count(
        self,
        counters: Sequence[Counter],
        shown: int = 0,
        passenger: Passenger | None = None,
        *,
        lease: bool = False,
    ) -> None:
        """Count the request in one round trip; without a breach the headers show `shown`.

        With a `passenger`, its commands go in that round trip too, and their replies to its
        receiver only when the request is admitted. Without one, `lease` lets the count come
        from this process's lease of hits (api/rate_leases.py), with no round trip at all.
        Raises `RateLimited` at the first breached window (the later ones are not counted);
        when Redis fails, starts an outage and lets the request through without headers
        (and without replies).
        """
        receiver: Receiver | None = None
        replies: list[Any] = []
        try:
            if passenger is None and lease and self.leases.leasable(counters):
                windows = self.leases.hit(counters)
            elif passenger is None:
                windows = self.windows.hit(counters)
            else:
                windows, receiver, replies = self.windows.hit_along(counters, passenger)
        except RedisError as exc:
            self.outage.report(exc)
            g.pop(_SHOWN, None)
            return
        last = windows[-1]
        if last.breached:
            setattr(g, _SHOWN, last)
            raise breach_error(last)
        setattr(g, _SHOWN, windows[shown])
        if receiver is not None:
            receiver(replies)


def ride_along(app: App, endpoint: str, redis: Redis, passenger: Passenger) -> bool:
    """Send `passenger`'s commands for `redis` in the round trip that counts `endpoint`.

    They ride with a caller counted per IP and per principal at once (a cached API key),
    and only when `redis` is the rate limiter's own database: elsewhere they would cost a
    round trip of their own, so the endpoint reads for itself. Its receiver gets the
    replies (a failed command's error in its place) once the request is admitted; never
    for a refused request, nor when Redis failed. Returns whether the commands will ride.
    """
    limits: _Limits = app.extensions[EXTENSION]
    if not same_redis(limits.windows.redis, redis):
        return False
    limits.passengers[endpoint] = passenger
    return True


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


def init_app(
    app: Flask, settings: Settings, throttled: Blueprint, forms: Mapping[str, str] | None = None
) -> None:
    """Limit every endpoint group per IP and per principal; `throttled` per IP and email.

    `forms` maps the endpoints of sign-in forms outside `throttled` to the sign-in endpoint
    whose windows they share: a form's POST counts as that sign-in, per IP and per email,
    so an attacker gets no more guesses by switching between the two.
    """
    form_scopes: Mapping[str, str] = forms or {}
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
    windows = RateWindows(redis)
    leases = Leases(windows, settings.rate_limit_lease)
    limits = _Limits(windows, outage, settings.rate_limit_prefix, leases)
    app.extensions[EXTENSION] = limits

    def counting() -> bool:
        return settings.rate_limits_enabled and not outage.active()

    def signing_in() -> bool:
        if request.blueprint == throttled.name:
            return True
        return request.endpoint in form_scopes and request.method == "POST"

    def admit_signin() -> None:
        # Per route, by IP and by email, shortest window first.
        endpoint = request.endpoint or ""
        scope = form_scopes.get(endpoint, endpoint)
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
        if request.endpoint in form_scopes:
            # A sign-in form counts as a sign-in (its GET, the empty form, not at all).
            if signing_in() and counting():
                admit_signin()
            return
        group = _group()
        if group is None:
            if signing_in() and counting():
                admit_signin()
            return
        if not counting():
            return
        by_ip, by_principal = ip_limits[group], principal_limits[group]
        counters = limits.counters(by_ip, ip_key(), f"ip-{group}")
        # A caller known without a lookup is counted per IP and per principal at once; the
        # IP's windows come first, so a refused IP spends none of the principal's.
        principal = cached_principal() if by_principal else None
        if principal is not None:
            shown = len(counters)
            counters += limits.counters(
                by_principal, principal_key(principal), f"principal-{group}"
            )
            passenger = limits.passengers.get(request.endpoint or "")
            limits.count(counters, shown, passenger, lease=True)
            return
        if counters:
            limits.count(counters, lease=True)
        if by_principal:
            principal = _verified_principal()
            if principal is not None and counting():
                limits.count(
                    limits.counters(by_principal, principal_key(principal), f"principal-{group}"),
                    lease=True,
                )

    if settings.rate_limit_headers:
        app.after_request(_add_headers(outage))
