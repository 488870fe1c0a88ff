"""Issue #15, finding 7: whatever bytes a header carries, no endpoint answers a 5xx.

Credentials are fuzzed against every route of the app (its `url_map`, path parameters
filled with a random uuid): a route that refuses an anonymous caller must refuse every odd
`Authorization` with 401 or 403, and no route may answer a 5xx. The other headers the API
reads (`X-Request-ID`, `Idempotency-Key`, `If-None-Match`, `X-Forwarded-For`) are fuzzed
with a valid key, so they reach the code behind authentication.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from flask import Flask
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr
from redis import Redis

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_lists
from conveyor.settings import Settings
from conveyor.telemetry.metrics import serve_metrics, token_matches
from tests.conftest import bearer
from tests.processes import own_queue

METRICS_TOKEN = "metrics-" + "t" * 24
# The test client sends header values as latin-1; Werkzeug refuses CR and LF in them.
HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=255, blacklist_characters="\r\n"),
    max_size=64,
)
B64 = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/", max_size=40
)


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


_HS256 = '{"alg":"HS256","typ":"JWT"}'
# JWTs whose parts decode, each wrong in its own way: the header or claims not an object,
# an algorithm that is not ours, critical extensions, claims of the wrong types, deep JSON.
CRAFTED_JWTS = [
    ".".join([_b64(header), _b64(claims), "c2ln"])
    for header, claims in [
        ("[]", "{}"),
        ('{"alg":"none"}', '{"sub":"x","type":"access"}'),
        ('{"alg":["HS256"]}', "{}"),
        ('{"alg":"HS256","crit":["b64"],"b64":false}', "{}"),
        ('{"alg":"HS256","kid":{"a":1}}', "{}"),
        (_HS256, '"claims"'),
        (_HS256, '{"sub":1,"exp":"soon","nbf":[],"type":"access"}'),
        (_HS256, '{"a":' + "[" * 3000 + "]" * 3000 + "}"),
        ('{"alg":"HS256","a":' + "[" * 3000 + "]" * 3000 + "}", "{}"),
    ]
]
HEX12 = st.text(alphabet="0123456789abcdef", min_size=12, max_size=12)
AUTHORIZATION = st.one_of(
    HEADER_TEXT,
    HEADER_TEXT.map(lambda s: "Bearer " + s),
    HEADER_TEXT.map(lambda s: "bearer  " + s + " "),
    HEADER_TEXT.map(lambda s: "Bearer cvk_" + s),
    st.tuples(HEX12, HEADER_TEXT).map(lambda t: f"Bearer cvk_{t[0]}_{t[1]}"),
    st.tuples(B64, B64, B64).map(lambda t: "Bearer " + ".".join(t)),
    st.tuples(B64, HEADER_TEXT).map(lambda t: f"Bearer eyJ{t[0]}.eyJ{t[1]}.sig"),
    st.sampled_from(CRAFTED_JWTS).map(lambda token: "Bearer " + token),
    st.sampled_from(["Bearer é", "Bearer \x00", "Basic dXNlcjpwYXNz", "Bearer", "Bearer  "]),
    st.integers(min_value=1_000, max_value=8_000).map(lambda n: "Bearer " + "\xff" * n),
)
EXAMPLES_PER_ROUTE = 12
BOUNDED = hypothesis_settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure reports at once
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def guarded_app(settings: Settings, redis_client: Redis) -> Iterator[Flask]:
    """The API with `/metrics` behind a token, one trusted proxy and a queue of its own."""
    own = own_queue(settings, "odd-headers").model_copy(
        update={"metrics_token": SecretStr(METRICS_TOKEN), "trusted_proxies": 1}
    )
    app = create_app(own)
    yield app
    app.extensions["conveyor"].engine.dispose()
    # Jobs it accepted were published with no worker to take them: drop them.
    redis_client.delete(*queue_lists(own.default_queue))


def routes(app: Flask) -> list[tuple[str, str]]:
    """Return (method, concrete path) for every route, path parameters as a random uuid."""
    found = []
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for argument in rule.arguments:
            for placeholder in (f"<{argument}>", f"<path:{argument}>"):
                path = path.replace(placeholder, str(uuid.uuid4()))
        found += [
            (method, path) for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})
        ]
    return found


def call(client: Any, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
    """Send one request; return its status and the start of its body, the response closed."""
    with client.open(path, method=method, **kwargs) as answer:  # static files stream
        return answer.status_code, answer.get_data()[:300]


def fuzz_authorization(
    client: Any, method: str, path: str, values: st.SearchStrategy[str], *, needs_credentials: bool
) -> None:
    """Send odd `Authorization` values to one route: never a 5xx; 401/403 where one is needed."""

    @given(authorization=values)
    @BOUNDED
    def fuzz(authorization: str) -> None:
        status, body = call(client, method, path, headers={"Authorization": authorization})
        assert status < 500, (method, path, authorization, body)
        if needs_credentials:
            assert status in (401, 403), (method, path, authorization, status)

    fuzz()


def fuzz_headers(client: Any, method: str, path: str, body: Any, credentials: str) -> None:
    """Send odd values of the other headers the API reads to one route: never a 5xx."""
    names = st.sampled_from(
        ["X-Request-ID", "Idempotency-Key", "If-None-Match", "X-Forwarded-For", "Accept", "Origin"]
    )
    # `/metrics` picks its format by the version in `Accept`.
    values = HEADER_TEXT | HEADER_TEXT.map(lambda s: f"application/openmetrics-text; version={s}")

    @given(headers=st.dictionaries(names, values, min_size=1))
    @BOUNDED
    def fuzz(headers: dict[str, str]) -> None:
        sent = {**headers, **bearer(credentials)}
        status, answer = call(client, method, path, json=body, headers=sent)
        assert status < 500, (method, path, headers, answer)

    fuzz()


def test_odd_credentials_never_reach_a_server_error(guarded_app: Flask, identity: Identity) -> None:
    client = guarded_app.test_client()
    # A real key's prefix with a wrong secret reaches the stored hash.
    prefix = identity.token.split("_")[1]
    values = AUTHORIZATION | HEADER_TEXT.map(lambda s: f"Bearer cvk_{prefix}_{s}")
    credentialed, checked = set(), 0
    for method, path in routes(guarded_app):
        needs_credentials = call(client, method, path)[0] == 401
        fuzz_authorization(client, method, path, values, needs_credentials=needs_credentials)
        checked += 1
        if needs_credentials:
            credentialed.add(path)
    assert {"/metrics", "/v1/jobs", "/v1/api-keys", "/v1/me"} <= credentialed
    assert checked >= 40


def test_odd_request_headers_never_reach_a_server_error(
    guarded_app: Flask, identity: Identity
) -> None:
    client = guarded_app.test_client()
    key = identity.token
    job = client.post("/v1/jobs", json={"type": "system.noop"}, headers=bearer(key)).get_json()
    login = {"email": "a@example.com", "password": "x" * 12}
    for method, path, body, credentials in [
        ("POST", "/v1/jobs", {"type": "system.noop"}, key),
        ("POST", "/v1/jobs/batch", {"jobs": [{"type": "system.noop"}]}, key),
        ("GET", f"/v1/jobs/{job['id']}", None, key),
        ("GET", "/v1/jobs", None, key),
        ("GET", "/metrics", None, METRICS_TOKEN),
        ("POST", "/v1/auth/login", login, key),
    ]:
        fuzz_headers(client, method, path, body, credentials)


@pytest.mark.parametrize(
    ("authorization", "matches"),
    [
        ("Bearer é", False),
        ("Bearer \x00\xff", False),
        ("Bearer \ud800", False),  # a lone surrogate, as a non-WSGI caller might pass
        (None, False),
        ("Bearer tökén", True),
        ("bearer  tökén ", True),
    ],
)
def test_the_metrics_token_check_takes_any_text(authorization: str | None, matches: bool) -> None:
    """The worker's exporter and `/metrics` share this check; it raised on non-ASCII text."""
    assert token_matches("tökén", authorization) is matches


ODD_ACCEPT = [
    "application/openmetrics-text; version=1.x",
    "text/plain; version=1.0.0-rc1",
    "application/openmetrics-text; version=\xff",
]


@pytest.mark.parametrize("accept", ODD_ACCEPT)
def test_an_odd_accept_on_metrics_gets_plain_text(guarded_app: Flask, accept: str) -> None:
    headers = {**bearer(METRICS_TOKEN), "Accept": accept}
    response = guarded_app.test_client().get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")


def test_the_worker_exporter_takes_odd_headers_too() -> None:
    server = serve_metrics("127.0.0.1", 0, METRICS_TOKEN)
    assert server is not None
    try:
        app = server.get_app()
        assert app is not None

        def status(headers: dict[str, str]) -> str:
            environ: dict[str, Any] = {f"HTTP_{k.upper()}": v for k, v in headers.items()}
            setup_testing_defaults(environ)
            seen: list[str] = []
            b"".join(app(environ, lambda status, _headers, *_: seen.append(status)))
            return seen[0]

        assert status({"Authorization": "Bearer é"}).startswith("401")
        for accept in ODD_ACCEPT:
            assert (
                status({"Authorization": f"Bearer {METRICS_TOKEN}", "Accept": accept}) == "200 OK"
            )
    finally:
        server.shutdown()
        server.server_close()
