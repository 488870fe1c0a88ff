"""Code samples on the site that run outside Conveyor, held to the code they describe."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import webhooks
from tests.test_quickstart import FIRST_JOB_TYPE, ROOT, fenced_block

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


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_first_job_type_test_passes(server_urls: tuple[str, str], tmp_path: Path) -> None:
    # A pytest of its own: importing the page's module registers `demo.greet` for good, which
    # this session's other tests must not see. It runs on this session's servers.
    package = tmp_path / "myjobs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "greetings.py").write_text(fenced_block(FIRST_JOB_TYPE, "first-job-type:module"))
    test_file = tmp_path / "test_greetings.py"
    test_file.write_text(fenced_block(FIRST_JOB_TYPE, "first-job-type:test"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "CONVEYOR_DATABASE_URL": server_urls[0],
        "CONVEYOR_REDIS_URL": server_urls[1],
    }
    # The project's settings and fixtures (tests/conftest.py, as a plugin) for a test
    # outside tests/, as a reader's own test file would have them.
    config = ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-p", "tests.conftest"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *config,
            "-p",
            "no:cacheprovider",
            "--no-cov",
            "-q",
            str(test_file),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout
