"""Code samples on the site that run outside Conveyor, held to the code they describe."""

from __future__ import annotations

import time
from typing import Any

import pytest

from conveyor import webhooks
from tests.test_quickstart import ROOT, fenced_block

SECRET = "whsec_test"
BODY = b'{"event": "job.succeeded"}'


def _receiver_verify() -> Any:
    """Return the `verify` of the webhooks guide's receiver sample."""
    namespace: dict[str, Any] = {}
    exec(fenced_block(ROOT / "docs" / "guides" / "webhooks.md", "webhooks:verify"), namespace)
    return namespace["verify"]


@pytest.mark.parametrize(
    "header",
    [
        "good",
        "stale",
        "t=abc,v1=00",
        "v1=00",
        "t=1",
        "",
        "garbage",
        "t=1,v1=ünïcode",
        "wrong-signature",
    ],
)
def test_the_receiver_sample_agrees_with_the_library(header: str) -> None:
    now = int(time.time())
    if header == "good":
        header = webhooks.sign(SECRET, now, BODY)
    elif header == "stale":
        header = webhooks.sign(SECRET, now - 3600, BODY)
    elif header == "wrong-signature":
        header = webhooks.sign("another", now, BODY)
    sample = _receiver_verify()(SECRET, header, BODY)
    assert sample is (header == webhooks.sign(SECRET, now, BODY))
    assert sample == webhooks.verify(SECRET, header, BODY, now)
