"""HTTP hygiene on every response: security headers, no caching of private answers, CORS."""

from __future__ import annotations

from flask import Flask, Response, request

from conveyor.settings import Settings

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-ID, If-None-Match"


def init_app(app: Flask, settings: Settings) -> None:
    """Add the headers; answer CORS preflights only for configured origins (none by default)."""
    origins = frozenset(settings.cors_origins)

    @app.before_request
    def _preflight() -> Response | None:
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            return Response(status=204 if request.headers.get("Origin") in origins else 403)
        return None

    @app.after_request
    def _headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if "Authorization" in request.headers:
            # Answers that depend on who asks must never sit in a shared cache.
            response.headers["Cache-Control"] = "no-store"
            response.vary.add("Authorization")
        origin = request.headers.get("Origin")
        if origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            response.headers["Access-Control-Expose-Headers"] = "Location, ETag, X-Request-ID"
            response.headers["Access-Control-Max-Age"] = "600"
            response.vary.add("Origin")
        return response
