"""The reference pages read from the API itself: permissions and the HTTP API.

Permissions come from every route's `@requires`, the HTTP API from the OpenAPI document
`/openapi.json` serves. Part of `devtools.docs_reference`, which writes and checks them.
"""

from __future__ import annotations

import re
from typing import Any

from devtools.docs_markdown import GENERATED
from devtools.docs_markdown import cell as _cell


def build_app(data_dir: str) -> Any:
    """Build the API without connecting to anything, to read its routes and its document."""
    from api import create_app
    from conveyor.settings import Settings

    # No .env and no CONVEYOR_* variable (a prefix nothing uses): the pages describe the
    # code, not this machine's settings (extra job modules would add their job types).
    settings = Settings(
        env="test",
        secret_key="docs-" + "k" * 40,
        data_dir=data_dir,
        _env_file=None,
        _env_prefix="CONVEYOR_DOCS_IGNORED_",
    )
    return create_app(settings)


def _routes(app: Any) -> list[tuple[str, str, str]]:
    """Return (method, path, permission) of every route that names who may call it."""
    from api.auth import ANY_CALLER, requires

    marker = requires(None)(lambda: None)  # the attribute `requires` sets, whatever its name
    attribute = next(name for name in vars(marker) if not name.startswith("__"))
    rows = []
    for rule in app.url_map.iter_rules():
        needed = getattr(app.view_functions[rule.endpoint], attribute, None)
        if needed is None:
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            rows.append((method, path, "any caller" if needed == ANY_CALLER else str(needed)))
    return sorted(rows, key=lambda row: (row[1], row[0]))


def permissions_page(app: Any) -> str:
    """Return the permission reference: what each role holds and what each route needs."""
    from conveyor.auth.roles import PERMISSIONS, Permission, Role

    out = [
        GENERATED.format(source="conveyor/auth/roles.py and the routes' @requires"),
        "# Permissions\n\n",
        "Every user and API key has one role within its tenant. A route names the "
        "permission it needs with `@requires(Permission.X)`, checked before its input is "
        "read (`403` when the role lacks it). Nobody creates, changes or revokes a user or "
        "key above their own role. [Tenants and roles](../concepts/tenants.md) explains "
        "the model.\n\n## Roles\n\n",
    ]
    roles = list(Role)
    out.append("| Permission | " + " | ".join(r.value for r in roles) + " |\n")
    out.append("| --- " * (len(roles) + 1) + "|\n")
    for permission in Permission:
        marks = ["✓" if permission in PERMISSIONS[role] else " " for role in roles]
        out.append(f"| `{permission.value}` | " + " | ".join(marks) + " |\n")
    out.append("\n## Routes\n\n| Route | Permission | Roles |\n| --- | --- | --- |\n")
    for method, path, needed in _routes(app):
        if needed == "any caller":
            who = "any signed-in caller"
        else:
            who = ", ".join(r.value for r in roles if Permission(needed) in PERMISSIONS[r])
        out.append(f"| `{method} {path}` | `{needed}` | {who} |\n")
    out.append(
        "\nRoutes not listed (`/healthz`, `/readyz`, `/openapi.json`, `/docs`, sign-up and "
        "sign-in) need no caller; `/metrics` needs `CONVEYOR_METRICS_TOKEN`.\n"
    )
    return "".join(out)


def _schema_name(schema: dict[str, Any], *, link: bool = False) -> str:
    """Return a short name for a schema: its component's name (linked), or its type."""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})" if link else name
    if "anyOf" in schema:
        return " or ".join(_schema_name(s, link=link) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items', {}), link=link)}"
    return str(schema.get("type", "any"))


def _properties(document: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Return the table rows of an object schema's properties."""
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        text = _cell(prop.get("description", ""))
        mark = "yes" if name in required else ""
        kind = _cell(_schema_name(prop, link=True))
        rows.append(f"| `{name}` | {kind} | {mark} | {text or ' '} |\n")
    return rows


def http_page(app: Any) -> str:
    """Return the HTTP API reference: every operation of the OpenAPI document, by tag."""
    document = app.test_client().get("/openapi.json").get_json()
    permissions = {(m, p): needed for m, p, needed in _routes(app)}
    out = [
        GENERATED.format(source="the OpenAPI document (api/openapi.py and the blueprints)"),
        "# HTTP API\n\n",
        f"{document['info']['description']} This page is generated from the OpenAPI "
        f"{document['openapi']} document every API instance serves at `/openapi.json`; "
        "`/docs` on a running instance is Swagger UI for the same document, where each "
        "operation can be tried. Errors are `application/problem+json` "
        "([Errors](errors.md)); who may call what is in [Permissions](permissions.md).\n\n",
    ]
    tags = {tag["name"]: tag.get("description", "") for tag in document.get("tags", [])}
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {name: [] for name in tags}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            tag = (operation.get("tags") or ["other"])[0]
            by_tag.setdefault(tag, []).append((path, method, operation))
    for tag, operations in by_tag.items():
        if not operations:
            continue
        out.append(f"## {tag}\n\n")
        if tags.get(tag):
            out.append(tags[tag] + "\n\n")
        for path, method, operation in operations:
            out.append(f"### `{method.upper()} {path}`\n\n")
            summary = operation.get("summary", "")
            description = operation.get("description", "")
            text = " ".join(p.strip() for p in (summary, description) if p.strip())
            out.append(text.rstrip(".") + ".\n\n")
            needed = permissions.get((method.upper(), path))
            if needed:
                out.append(f"Permission: `{needed}`.\n\n")
            parameters = operation.get("parameters", [])
            if parameters:
                out.append("| Parameter | In | Type | Required | Meaning |\n")
                out.append("| --- | --- | --- | --- | --- |\n")
                for p in parameters:
                    kind = _cell(_schema_name(p.get("schema", {})))
                    req = "yes" if p.get("required") else ""
                    text = _cell(p.get("description", "")) or " "
                    out.append(f"| `{p['name']}` | {p['in']} | {kind} | {req} | {text} |\n")
                out.append("\n")
            body = operation.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                rows = _properties(document, content.get("schema", {}))
                body_schema = _schema_name(content.get("schema", {}), link=True)
                out.append(f"Body (`{media}`, {body_schema}):\n\n")
                if rows:
                    out.append("| Field | Type | Required | Meaning |\n| --- | --- | --- | --- |\n")
                    out.extend(rows)
                    out.append("\n")
            answers, problems = [], []
            for status, response in sorted(operation.get("responses", {}).items()):
                media_types: dict[str, Any] = response.get("content", {})
                first: dict[str, Any] = next(iter(media_types.values()), {})
                schema = first.get("schema")
                if schema and _schema_name(schema) == "Problem":
                    problems.append(f"`{status}`")
                    continue
                shown = f" ({_schema_name(schema, link=True)})" if schema else ""
                answers.append(f"`{status}`{shown} {response.get('description', '')}".strip())
            if answers:
                out.append("Answers:\n\n" + "".join(f"- {a}\n" for a in answers) + "\n")
            if problems:
                out.append(f"Problems: {', '.join(problems)}.\n\n")
    out.append("## Schemas\n\nThe bodies named above, field by field.\n\n")
    for name, schema in sorted(document["components"]["schemas"].items()):
        out.append(f"### {name}\n\n")
        if schema.get("description"):
            out.append(_cell(schema["description"]) + "\n\n")
        rows = _properties(document, schema)
        if rows:
            out.append("| Field | Type | Required | Meaning |\n| --- | --- | --- | --- |\n")
            out.extend(rows)
            out.append("\n")
        elif "enum" in schema:
            out.append("One of " + ", ".join(f"`{v}`" for v in schema["enum"]) + ".\n\n")
    return "".join(out).rstrip() + "\n"
