"""HTTP hygiene: security headers, no-store on authenticated answers, CORS off unless set."""

from __future__ import annotations

from typing import Any

from api import create_app
from conveyor.settings import Settings


def test_security_headers_and_no_store(client: Any, auth: dict[str, str]) -> None:
    public = client.get("/healthz")
    assert public.headers["X-Content-Type-Options"] == "nosniff"
    assert public.headers["Referrer-Policy"] == "no-referrer"
    assert "no-store" not in public.headers.get("Cache-Control", "")
    private = client.get("/v1/me", headers=auth)
    assert private.headers["Cache-Control"] == "no-store"
    assert "Authorization" in private.headers["Vary"]
    failed = client.get("/v1/me", headers={"Authorization": "Bearer nope"})
    assert failed.headers["Cache-Control"] == "no-store"


def test_cors_is_off_by_default_and_exact_when_configured(client: Any, settings: Settings) -> None:
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
    }
    assert client.options("/v1/jobs", headers=preflight).status_code == 403
    plain = client.get("/healthz", headers={"Origin": "https://app.example.com"})
    assert "Access-Control-Allow-Origin" not in plain.headers
    app = create_app(settings.model_copy(update={"cors_origins": ["https://app.example.com"]}))
    allowed = app.test_client()
    answer = allowed.options("/v1/jobs", headers=preflight)
    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Idempotency-Key" in answer.headers["Access-Control-Allow-Headers"]
    other = allowed.options("/v1/jobs", headers={**preflight, "Origin": "https://evil.example"})
    assert other.status_code == 403
    assert "Access-Control-Allow-Origin" not in other.headers
    app.extensions["conveyor"].engine.dispose()
