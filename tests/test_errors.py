"""The exception tree: every error says when it is raised, carries no HTTP, and has a problem type.

`conveyor.errors` says what went wrong; `api.errors.PROBLEM_TYPES` alone says how HTTP
answers it. These tests find every error class the packages define, wherever it lives.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.util import find_spec

import pytest

from api.errors import PROBLEM_TYPES, problem_type
from api.openapi import PROBLEMS
from conveyor.errors import ConveyorError, JobCancelled, JobFailed, LostOwnership

# The domain plugin's package is searched too once it exists outside `worker/`.
PACKAGES = [name for name in ("conveyor", "api", "worker", "domains") if find_spec(name)]
# Scripts that configure the process (logging, metrics, a Celery app) when imported; they
# define no errors.
SCRIPTS = {"api.gunicorn_config", "worker.main"}
# The errors that end a job's attempt inside a worker never answer a request: they have no
# problem type of their own and would answer as the root, an internal error.
ATTEMPT_ERRORS = (JobFailed, JobCancelled, LostOwnership)
# Attributes that would put HTTP back into the core.
HTTP_ATTRIBUTES = {"status", "status_code", "http_status", "code", "title", "slug", "headers"}


def _tree() -> list[type[ConveyorError]]:
    """Import every module of the packages, then return every class of the tree."""
    for name in PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(package.__path__, f"{name}."):
            if module.name not in SCRIPTS:
                importlib.import_module(module.name)
    found: list[type[ConveyorError]] = []
    waiting: list[type[ConveyorError]] = [ConveyorError]
    while waiting:
        cls = waiting.pop()
        found.append(cls)
        waiting.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


TREE = _tree()


def test_the_tree_holds_the_errors_defined_outside_conveyor_errors() -> None:
    names = {cls.__name__ for cls in TREE}
    # Errors that live beside their code, and the names a job's `error.type` shows clients.
    assert {"BlockedDestination", "DeliveryFailed"} <= names
    assert {"WorkerLost", "TimeLimitExceeded", "DatabaseError", "PermanentError"} <= names


@pytest.mark.parametrize("cls", TREE, ids=lambda cls: cls.__name__)
def test_every_error_says_in_one_line_when_it_is_raised(cls: type[ConveyorError]) -> None:
    doc = vars(cls).get("__doc__") or ""
    assert doc.startswith("Raised when "), doc
    assert "\n" not in doc.strip()


@pytest.mark.parametrize("cls", TREE, ids=lambda cls: cls.__name__)
def test_every_error_answers_with_a_problem_type_unless_it_ends_an_attempt(
    cls: type[ConveyorError],
) -> None:
    internal = PROBLEM_TYPES[ConveyorError]
    if issubclass(cls, ATTEMPT_ERRORS):
        assert problem_type(cls) is internal
    elif cls is not ConveyorError:
        # Its own entry, or one inherited from an ancestor that answers requests.
        assert problem_type(cls) is not internal


def test_the_most_specific_entry_wins() -> None:
    from conveyor.errors import QuotaExceeded, RateLimited, UnknownJobType, ValidationFailed

    assert problem_type(QuotaExceeded).slug == "quota-exceeded"
    assert problem_type(RateLimited).slug == "rate-limited"
    assert problem_type(UnknownJobType).slug == "unknown-job-type"

    class Stale(ValidationFailed):
        """Raised when a test needs an error the table does not list."""

    assert problem_type(Stale) is PROBLEM_TYPES[ValidationFailed]


def test_every_status_of_the_table_is_documented() -> None:
    statuses = {kind.status for kind in PROBLEM_TYPES.values()}
    assert statuses <= set(PROBLEMS)


@pytest.mark.parametrize("cls", TREE, ids=lambda cls: cls.__name__)
def test_no_error_carries_http(cls: type[ConveyorError]) -> None:
    assert not set(vars(cls)) & HTTP_ATTRIBUTES


def test_an_error_holds_what_happened_and_nothing_else() -> None:
    assert vars(ConveyorError("gone", errors=[{"field": "x", "message": "y"}])) == {
        "detail": "gone",
        "errors": [{"field": "x", "message": "y"}],
    }
