"""Write the documentation site's reference pages from the code they describe.

`python -m devtools.docs_reference` rewrites `docs/reference/*.md`; `--check` writes
nothing and exits 1 naming every page that no longer matches the code
(tests/test_docs_reference.py runs the same check, and `make docs` runs it before the
build). The pages are: configuration (`conveyor.settings.Settings`, described by the
comments of `.env.example`), the CLI (`conveyor.cli.main`), metrics
(`conveyor.telemetry.metrics`), permissions (`conveyor.auth.roles` and every route's
`@requires`), errors (`conveyor.errors` with `api.errors.PROBLEM_TYPES`) and the HTTP API
(the OpenAPI document `/openapi.json` serves).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import click
from annotated_types import Ge, Gt, Le, Lt
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import Metric
from pydantic.fields import FieldInfo

from devtools.docs_api import build_app, http_page, permissions_page
from devtools.docs_markdown import GENERATED, REFERENCE, ROOT
from devtools.docs_markdown import cell as _cell

ENV_EXAMPLE = ROOT / ".env.example"
SETTING_LINE = re.compile(r"^#?\s*(CONVEYOR_[A-Z0-9_]+)=(.*)$")


# --- configuration -------------------------------------------------------------------


@dataclass
class EnvBlock:
    """One commented group of settings in `.env.example`."""

    comment: list[str] = field(default_factory=list)
    settings: list[tuple[str, str]] = field(default_factory=list)  # (name, example value)
    procfile: bool = False


def env_blocks(text: str) -> list[EnvBlock]:
    """Split `.env.example` into its comment blocks, each with the settings it describes."""
    blocks: list[EnvBlock] = []
    current = EnvBlock()
    procfile = False
    lines = text.splitlines()
    # The header (up to the first blank line) introduces the file; it describes no setting.
    start = lines.index("") + 1 if "" in lines else 0
    for line in lines[start:]:
        stripped = line.strip()
        setting = SETTING_LINE.match(stripped)
        if setting:
            current.settings.append((setting.group(1), setting.group(2)))
        elif stripped.startswith("#"):
            body = stripped[1:].strip()
            if body.startswith("Read by the Procfile"):
                procfile = True
                continue
            if current.settings:  # a comment after settings starts the next block
                blocks.append(current)
                current = EnvBlock(procfile=procfile)
            current.procfile = procfile
            current.comment.append(body)
        elif not stripped and current.settings:
            blocks.append(current)
            current = EnvBlock(procfile=procfile)
    if current.settings:
        blocks.append(current)
    return blocks


TYPE_NAMES = {
    "str": "text",
    "int": "integer",
    "float": "number",
    "bool": "`true` or `false`",
    "SecretStr": "secret text",
    "list[str]": "JSON list of text",
}


def _describe_type(info: FieldInfo) -> str:
    """Return a field's type and bounds as a reader would say them."""
    annotation = info.annotation
    text = inspect.formatannotation(annotation) if annotation is not None else "any"
    text = text.replace("pydantic.types.", "").replace("typing.", "").removesuffix(" | None")
    text = re.sub(r"^Optional\[(.*)\]$", r"\1", text)
    literal = re.fullmatch(r"Literal\[(.*)\]", text)
    if literal:
        choices = [f"`{c.strip(chr(39))}`" for c in literal.group(1).split(", ")]
        text = ", ".join(choices[:-1]) + " or " + choices[-1]
    else:
        text = TYPE_NAMES.get(text, text)
    bounds = []
    for item in info.metadata:
        for kind, attribute, symbol in (
            (Ge, "ge", "≥"),
            (Gt, "gt", ">"),
            (Le, "le", "≤"),
            (Lt, "lt", "<"),
        ):
            if isinstance(item, kind):
                bounds.append(f"{symbol} {getattr(item, attribute)}")
    return ", ".join([text, *bounds])


def _describe_default(info: FieldInfo) -> str:
    """Return a field's default as it would be written in the environment."""
    if info.is_required():
        return "required"
    default = info.get_default(call_default_factory=True)
    if default is None:
        return "unset"
    if hasattr(default, "get_secret_value"):
        default = default.get_secret_value()
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, list):
        return f"`{json.dumps(default)}`"
    return f"`{default}`" if default != "" else "empty"


def configuration_page() -> str:
    """Return the configuration reference: every setting, its type, default and meaning."""
    from conveyor.settings import Settings

    fields = Settings.model_fields
    blocks = env_blocks(ENV_EXAMPLE.read_text())
    documented = {name for block in blocks for name, _ in block.settings}
    missing = sorted({f"CONVEYOR_{n.upper()}" for n in fields} - documented)
    if missing:
        raise SystemExit(f".env.example does not document {', '.join(missing)}")
    out = [
        GENERATED.format(source="conveyor/settings.py and .env.example"),
        "# Configuration\n\n",
        "Every setting is an environment variable (or a line of a `.env` file in the working "
        "directory) read once at start by `conveyor.settings.Settings`. Lists are JSON "
        '(`CONVEYOR_JOB_MODULES=["acme.jobs"]`); a list setting **replaces** its default, it '
        "never adds to it. [Deploy with Compose](../operations/deploy.md#the-env-trap) "
        "explains how Compose reads the same `.env` file and how to quote lists there.\n\n",
        "Production (`CONVEYOR_ENV=production`) refuses to start without a strong "
        "`CONVEYOR_SECRET_KEY` and `CONVEYOR_FLOWER_PASSWORD`.\n\n",
    ]
    out.append("| Setting | Type | Default | Meaning |\n| --- | --- | --- | --- |\n")
    for block in blocks:
        if block.procfile:
            continue
        # A block's comment describes all its settings: shown once, beside the first.
        meaning = _cell(" ".join(block.comment))
        for n, (name, _) in enumerate(block.settings):
            info = fields[name.removeprefix("CONVEYOR_").lower()]
            shown = meaning if n == 0 else "(with the setting above)"
            out.append(
                f"| `{name}` | {_cell(_describe_type(info))} | {_describe_default(info)} "
                f"| {shown} |\n"
            )
    out.append("\n")
    out.append(
        "## Read by the Procfile\n\nThese are read by the `Procfile`'s commands (and "
        "`docker-compose.yml`), not by `Settings`.\n\n"
    )
    out.append("| Variable | Default | Meaning |\n| --- | --- | --- |\n")
    for block in blocks:
        if not block.procfile:
            continue
        meaning = _cell(" ".join(block.comment))
        for n, (name, value) in enumerate(block.settings):
            shown = meaning if n == 0 else "(with the variable above)"
            out.append(f"| `{name}` | `{value}` | {shown} |\n")
    return "".join(out).rstrip() + "\n"


# --- CLI ------------------------------------------------------------------------------


def _commands(
    command: click.Command, parent: click.Context | None = None
) -> Iterator[tuple[click.Command, click.Context]]:
    """Yield every command under `command`, groups first, each with its context."""
    ctx = click.Context(command, info_name=command.name if parent else "conveyor", parent=parent)
    yield command, ctx
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from _commands(command.commands[name], ctx)


def cli_page() -> str:
    """Return the CLI reference: every command, its usage, arguments and options."""
    from conveyor.cli import main

    out = [GENERATED.format(source="conveyor/cli.py"), "# CLI\n\n"]
    out.append(
        "`conveyor` is installed with the project (`.venv/bin/conveyor`; in the image, on "
        "the `PATH`). The API commands take the URL and key from `--url`/`--key` or "
        "`CONVEYOR_URL`/`CONVEYOR_API_KEY`; `create-tenant`, `migrate`, `alembic` and "
        "`queues pause --all-tenants` work on the database directly with the "
        "[settings](configuration.md). API errors print the problem and exit 1.\n\n"
    )
    for command, ctx in _commands(main):
        path = ctx.command_path
        out.append(f"## `{path}`\n\n")
        out.append(inspect.cleandoc(command.help or "") + "\n\n")
        pieces = " ".join(command.collect_usage_pieces(ctx))
        out.append(f"```\n{path} {pieces}\n```\n\n")
        records = []
        for param in command.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                records.append(record)
        if records:
            out.append("| Option | Meaning |\n| --- | --- |\n")
            out.extend(f"| `{_cell(opts)}` | {_cell(text) or ' '} |\n" for opts, text in records)
            out.append("\n")
    return "".join(out).rstrip() + "\n"


# --- metrics --------------------------------------------------------------------------


def _metric_rows() -> list[tuple[str, str, list[str], str]]:
    """Return (name, type, labels, help) of every metric Conveyor itself exports."""
    from conveyor.ledger.flow import FlowStats
    from conveyor.queues import QueueStats
    from conveyor.telemetry import metrics

    rows = []
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram):
            # prometheus_client keeps a metric's label names only on this attribute.
            labels = list(value._labelnames)
            described = next(iter(value.describe()))
            name = described.name + ("_total" if described.type == "counter" else "")
            rows.append((name, described.type, labels, described.documentation))
    # The scrape-time collectors: fed one made-up row each, so every sample shows its labels.
    queue = QueueStats(name="q", depth=0, queued=0, oldest_queued_at=None, running=0)
    flow = FlowStats(limits=[("t", "k", 0, 0)], waiting=[("q", "limit", 0)])
    collectors: list[Callable[[], Iterator[Metric]]] = [
        metrics.QueueCollector(lambda: ([queue], [])).collect,
        metrics.FlowCollector(lambda: flow).collect,
    ]
    for collect in collectors:
        for family in collect():
            labels = list(family.samples[0].labels) if family.samples else []
            rows.append((family.name, family.type, labels, family.documentation))
    return sorted(rows)


def metrics_page() -> str:
    """Return the metrics reference: every metric with its type, labels and meaning."""
    out = [GENERATED.format(source="conveyor/telemetry/metrics.py"), "# Metrics\n\n"]
    out.append(
        "Conveyor's own metrics. Counters and histograms come from the process that counts "
        "them (API, worker or beat); the gauges are read from the broker and the ledger when "
        "an API instance is scraped, so every instance reports the same values: aggregate "
        "them with `max`. The API also exports prometheus-flask-exporter's "
        "`flask_http_request_duration_seconds{endpoint,method,status}` and "
        "`flask_http_request_total{method,status}`. Scraping and alerts: "
        "[Monitoring](../operations/monitoring.md).\n\n"
    )
    out.append("| Metric | Type | Labels | Meaning |\n| --- | --- | --- | --- |\n")
    for name, kind, labels, help_text in _metric_rows():
        shown = ", ".join(f"`{label}`" for label in labels) or " "
        out.append(f"| `{name}` | {kind} | {shown} | {_cell(help_text)} |\n")
    return "".join(out)


# --- errors ---------------------------------------------------------------------------


def errors_page() -> str:
    """Return the error reference: the exception tree, with each class's HTTP answer."""
    from api.errors import PROBLEM_TYPE_BASE, PROBLEM_TYPES, problem_type
    from conveyor.errors import ConveyorError, JobFailed

    out = [
        GENERATED.format(source="conveyor/errors.py and api/errors.py"),
        "# Errors\n\n",
        "Every error answer, Conveyor's or the HTTP layer's, is `application/problem+json` "
        "(RFC 9457) with `type`, `title`, `status`, `detail` and `request_id`; a `422` adds "
        "`errors`, a list of `{field, message}`. A `500` says only to quote the request id: "
        "the traceback is in the log under it. Code raises the classes of "
        "`conveyor/errors.py`; `api/errors.py` alone decides how each answers over HTTP (a "
        "class without an entry answers as its nearest listed ancestor).\n\n",
        "| Class | Raised when | HTTP | `type` |\n| --- | --- | --- | --- |\n",
    ]

    def walk(cls: type[ConveyorError], depth: int) -> Iterator[tuple[type[ConveyorError], int]]:
        yield cls, depth
        for sub in sorted(cls.__subclasses__(), key=lambda c: c.__name__):
            if sub.__module__ == "conveyor.errors":
                yield from walk(sub, depth + 1)

    job_side = []
    for cls, depth in walk(ConveyorError, 0):
        doc = _cell((cls.__doc__ or "").strip().removeprefix("Raised when "))
        name = "&nbsp;&nbsp;" * depth + f"`{cls.__name__}`"
        if issubclass(cls, JobFailed) or (cls not in PROBLEM_TYPES and depth == 1):
            job_side.append((name, doc))
            continue
        problem = problem_type(cls)
        listed = "" if cls in PROBLEM_TYPES else " (its ancestor's)"
        out.append(
            f"| {name} | {doc} | {problem.status} {problem.title}{listed} | "
            f"`{PROBLEM_TYPE_BASE}{problem.slug}` |\n"
        )
    out.append(
        "\n## Errors that end a job's attempt\n\n"
        "These never reach a request. A failed job's `error.type` is the class name of what "
        "ended its last attempt: one of these, or the job function's own exception.\n\n"
        "| Class | Raised when |\n| --- | --- |\n"
    )
    out.extend(f"| {name} | {doc} |\n" for name, doc in job_side)
    return "".join(out)


# --- entry point ----------------------------------------------------------------------


def pages() -> dict[str, str]:
    """Return every generated page's file name and text."""
    with tempfile.TemporaryDirectory(prefix="conveyor-docs-") as data_dir:
        app = build_app(data_dir)
        return {
            "configuration.md": configuration_page(),
            "cli.md": cli_page(),
            "metrics.md": metrics_page(),
            "permissions.md": permissions_page(app),
            "errors.md": errors_page(),
            "http-api.md": http_page(app),
        }


def stale_pages() -> list[str]:
    """Return the generated pages whose committed text differs from the code's."""
    return [
        name
        for name, text in pages().items()
        if not (REFERENCE / name).exists() or (REFERENCE / name).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    """Write the reference pages, or with --check report the stale ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for name in stale:
            print(f"docs/reference/{name} is stale: run `make docs-reference`", file=sys.stderr)
        return 1 if stale else 0
    REFERENCE.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (REFERENCE / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
