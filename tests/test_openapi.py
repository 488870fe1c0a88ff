"""The OpenAPI document: valid 3.1, complete for every route, and Swagger UI that works offline."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from openapi_spec_validator import validate
from werkzeug.serving import make_server

from api.openapi import DOCS_CSP
from tests.browser import ARTIFACTS, CHROMIUM_FLAGS, chromium

# Routes that are not part of the public API's document, and why.
UNDOCUMENTED = {
    "/metrics",  # Prometheus text format, behind its own token
    "/openapi.json",
    "/docs",
    "/docs/assets/<path:name>",
    "/docs/swagger/<path:name>",
    "/static/<path:filename>",
}
# Operations anyone may call: probes, and signing up, in or back in.
PUBLIC = {"/healthz", "/readyz", "/v1/auth/register", "/v1/auth/login", "/v1/auth/refresh"}
METHODS = {"get", "post", "put", "patch", "delete"}

# Path parameters that name something in the caller's tenant rather than an object by id.
NAMED = frozenset({"key", "queue"})


@pytest.fixture
def document(client: Any) -> dict[str, Any]:
    """Return the served document."""
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    found: dict[str, Any] = response.get_json()
    return found


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield (path, method, operation) for every operation in the document."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a `$ref` into the document's components."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    found: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return found


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema


def test_every_route_is_documented(app: Any, document: dict[str, Any]) -> None:
    routed = set()
    for rule in app.url_map.iter_rules():
        # The console is pages for people, not API operations (tests/test_console.py).
        if rule.rule in UNDOCUMENTED or rule.rule.startswith("/console/"):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routed |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, method, _ in operations(document)}
    assert routed == documented
    assert len(documented) >= 37


def test_every_operation_has_summary_security_schemas_errors_and_examples(
    document: dict[str, Any],
) -> None:
    schemas = document["components"]["schemas"]
    for path, method, operation in operations(document):
        where = f"{method.upper()} {path}"
        assert operation.get("summary"), where
        assert operation.get("tags"), where
        security = operation.get("security")
        assert (security is None) == (path in PUBLIC), where
        if security is not None:
            assert security == [{"bearer": []}], where
        answers = operation["responses"]
        ok = [code for code in answers if code.startswith("2")]
        assert ok, where
        for code in ok:
            if code != "204":
                assert answers[code].get("content"), f"{where} {code}"
        problems = [code for code in answers if code[0] in "45"]
        assert "500" in problems, where
        for code in problems:
            if (path, code) == ("/readyz", "503"):
                continue  # a probe's answer: which dependency is down, as JSON
            media = answers[code]["content"]["application/problem+json"]
            assert media["schema"] == {"$ref": "#/components/schemas/Problem"}, f"{where} {code}"
        if security is not None:
            assert {"401", "403", "429"} <= set(answers), where
        for name in re.findall(r"{([^}]+)}", path):
            params = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "path"}
            if name in NAMED:  # a name within the caller's tenant (a limit, a queue)
                assert params[name]["schema"]["maxLength"] <= 100, f"{where} {name}"
                continue
            assert params[name]["schema"]["format"] == "uuid", f"{where} {name}"
            assert "404" in answers, where
        body = operation.get("requestBody")
        if body and "application/json" in body["content"]:
            schema = resolve(document, body["content"]["application/json"]["schema"])
            assert schema.get("example"), f"{where}: request example"
            assert {"400", "413", "415", "422"} <= set(answers), where
    assert schemas["Problem"]["example"]["status"] == 422
    assert schemas["JobOut"]["example"]["state"] == "running"
    assert schemas["JobRequest"]["example"]["type"] == "system.sleep"


def test_the_document_examples_are_accepted_by_the_api(
    client: Any, auth: dict[str, str], document: dict[str, Any]
) -> None:
    example = document["components"]["schemas"]["JobRequest"]["example"]
    response = client.post("/v1/jobs", json=example, headers=auth)
    assert response.status_code == 202, response.get_json()
    batch = document["components"]["schemas"]["JobBatch"]["example"]
    response = client.post("/v1/jobs/batch", json=batch, headers=auth)
    assert response.status_code == 202, response.get_json()


def test_the_docs_page_is_self_contained_under_a_strict_csp(client: Any) -> None:
    with client.get("/docs") as page:
        assert page.status_code == 200
        assert page.headers["Content-Security-Policy"] == DOCS_CSP
        html = page.get_data(as_text=True)
    assert "'unsafe-inline'" not in DOCS_CSP
    # Nothing inline for the CSP to block.
    assert "<script>" not in html
    assert "style=" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from another host
    assets = re.findall(r"(?:src|href)=\"(/docs/[^\"]+)\"", html)
    assert len(assets) == 6
    for asset in assets:
        with client.get(asset) as response:
            assert response.status_code == 200, asset


@pytest.fixture
def live_api(app: Any) -> Iterator[str]:
    """Serve the app over HTTP on a loopback port for a browser."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.mark.e2e
def test_swagger_ui_renders_offline_in_headless_chromium(
    live_api: str, document: dict[str, Any]
) -> None:
    executable = chromium()
    from playwright.sync_api import Route, sync_playwright

    elsewhere: list[str] = []
    console: list[str] = []

    def loopback_only(route: Route) -> None:
        # The page must need nothing but this server: refuse, and note, anything else.
        if route.request.url.startswith(live_api):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "api-docs.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda message: console.append(message.text))
            page.route("**/*", loopback_only)
            page.goto(f"{live_api}/docs", wait_until="networkidle")
            page.locator(".opblock").first.wait_for(timeout=20_000)
            rendered = page.locator(".opblock").count()
            title = page.locator(".info .title").inner_text()
            page.screenshot(path=str(shot), full_page=False)
        finally:
            browser.close()
    assert rendered == sum(1 for _ in operations(document))
    assert title.startswith("Conveyor")
    assert elsewhere == []
    assert not [m for m in console if "Content Security Policy" in m], console
    assert shot.stat().st_size > 20_000


def test_a_query_model_builds_its_schema_once_and_still_validates(
    client: Any, auth: dict[str, str]
) -> None:
    """flask-openapi3 reads a query model's schema per request: it must come from the cache."""
    from unittest import mock

    from pydantic import BaseModel

    from api.schemas import JobListQuery

    assert JobListQuery.model_json_schema() is JobListQuery.model_json_schema()
    # Other arguments (the OpenAPI document's) are never served from the default's cache.
    assert JobListQuery.model_json_schema(mode="serialization") is not (
        JobListQuery.model_json_schema()
    )
    headers = auth
    with mock.patch.object(
        BaseModel, "model_json_schema", side_effect=AssertionError("built per request")
    ):
        assert client.get("/v1/jobs?limit=1", headers=headers).status_code == 200
        refused = client.get("/v1/jobs?limit=0", headers=headers)
    assert refused.status_code == 422
    assert refused.get_json()["errors"][0]["field"] == "limit"


def test_json_options_still_format_as_asked(app: Any) -> None:
    """orjson serves plain dumps; a template's `tojson(indent=2)` keeps its indentation."""
    from datetime import UTC, datetime

    with app.app_context():
        assert app.json.dumps({"a": [1]}) == '{"a":[1]}'
        assert app.json.dumps({"a": [1]}, indent=2) == '{\n  "a": [\n    1\n  ]\n}'
        # Flask's rule for dates (an HTTP date), not orjson's ISO 8601.
        when = datetime(2026, 12, 8, 3, 0, tzinfo=UTC)
        assert app.json.dumps({"at": when}) == '{"at":"Tue, 08 Dec 2026 03:00:00 GMT"}'
        assert app.json.loads('{"n": NaN}')["n"] != 0  # the standard parser's NaN, as before
