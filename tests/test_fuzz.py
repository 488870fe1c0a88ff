"""schemathesis against the app's own `/openapi.json`, with a valid admin key.

Each operation gets a bounded number of generated requests (valid and invalid), in a fixed
order (`derandomize`), so a run is repeatable; every answer must be a documented status,
with the documented content type, headers and schema, and none may be a 5xx.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from redis import Redis
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.broker.inspect import queue_lists
from conveyor.settings import Settings
from tests.conftest import bearer
from tests.processes import own_queue

# Per operation and mode: ~1,500 requests in all, about two minutes on a busy 2-core machine.
EXAMPLES_PER_OPERATION = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def fuzzed_app(settings: Settings, redis_client: Redis) -> Iterator[Any]:
    """An app with a queue and rate-limit counters of its own, emptied afterwards."""
    own = own_queue(settings, "fuzz").model_copy(
        update={"rate_limit_prefix": f"fuzz-{uuid.uuid4().hex[:8]}"}
    )
    app = create_app(own)
    # As in a stopping server: event streams end after what they have to send, and long
    # polls answer at once, so each fuzzed call returns (a tenant's stream never ends).
    app.extensions["conveyor"].hub.close()
    yield app
    app.extensions["conveyor"].engine.dispose()
    # Jobs it accepted were published with no worker to take them: drop them.
    redis_client.delete(*queue_lists(own.default_queue))


# Bounded by the example count; the time cap is for a machine busy with other work.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_is_documented_and_none_is_a_server_error(
    fuzzed_app: Any, identity: Identity, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzzed_app)
    failures: dict[str, str] = {}
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        tried += 1

        @given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis_settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,  # the same requests every run
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers=bearer(identity.token), checks=CHECKS)

        try:
            fuzz()
        except Unsatisfiable:
            continue  # no invalid input exists for an operation that takes none
        except (AssertionError, FailureGroup) as exc:  # note it, go on to the next operation
            failures[operation.label] = str(exc)[:2000]
    assert tried >= 37
    assert failures == {}, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
