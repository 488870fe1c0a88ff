"""Imports point inward (DESIGN.md): `api -> conveyor <- worker`, and domains -> conveyor.

`api` and `worker` never name each other, not even by a module path in a string; the core
names neither, nor any domain (it finds domains through entry points); a domain names
neither `api` nor `worker`; no shipped package names `devtools` (make run's tooling).
Ruff's banned-api rule catches some imports; this catches them all, and the strings.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The packages whose modules may not name another one, by import or in a string.
FORBIDDEN = {
    "api": {"worker", "domains", "devtools"},
    "worker": {"api", "domains", "devtools"},
    "conveyor": {"api", "worker", "domains", "devtools"},
    "domains": {"api", "worker", "devtools"},
    "migrations": {"api", "worker", "domains", "devtools"},
}
# A module path in a string, as `importlib`, `pkgutil.resolve_name` or a setting takes it.
MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")


def named_modules(source: str) -> Iterator[tuple[int, str]]:
    """Yield (line, module) for every absolute import and module path in a string."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            if MODULE_PATH.match(text):
                yield node.lineno, text


def crossings(root: Path) -> list[str]:
    """Return every place under `root` where a package names one it may not."""
    found = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, module in named_modules(path.read_text()):
                if module.split(".")[0] in forbidden:
                    found.append(f"{path.relative_to(root)}:{line}: {module}")
    return found


def test_no_package_names_one_it_may_not() -> None:
    assert crossings(ROOT) == []


@pytest.mark.parametrize(
    "source",
    [
        "import worker.app",
        "from worker.orders import models",
        "modules = ['worker.orders.api']",
        "importlib.import_module('worker.orders.jobs')",
        "routes = 'worker.orders.api:bp'",
    ],
)
def test_an_import_or_a_module_path_in_a_string_is_seen(source: str) -> None:
    assert [module.split(".")[0] for _, module in named_modules(source)] == ["worker"]


@pytest.mark.parametrize(
    "source", ["'the worker runs it'", "'worker'", "'conveyor.domains'", "'python:api.gunicorn'"]
)
def test_words_and_other_packages_are_not_module_paths(source: str) -> None:
    assert [m for _, m in named_modules(source) if m.split(".")[0] in {"worker", "api"}] == []
