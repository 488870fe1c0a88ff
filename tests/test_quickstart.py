"""The README's quickstart and "Your first job type", run as written against a real `make run`.

The shell blocks are taken from the pages themselves (between their HTML-comment markers),
so a page that stops working fails here. Bounded: one stack, started once (up to 4 minutes
on a busy machine), each block under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.embedded import free_port
from tests.conftest import wait_for
from tests.test_devstack import devstack, request

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
QUICKSTART = ROOT / "docs" / "get-started" / "quickstart.md"
FIRST_JOB_TYPE = ROOT / "docs" / "get-started" / "first-job-type.md"
DOCUMENTED_API = "http://127.0.0.1:8000"


def fenced_block(page: Path, marker: str) -> str:
    """Return the code of the fenced block right after `<!-- marker -->` on `page`."""
    text = page.read_text()
    start = text.index(f"<!-- {marker} -->\n")
    fence_open = text.index("```", start)
    body_start = text.index("\n", fence_open) + 1
    return text[body_start : text.index("```", body_start)]


def test_the_readme_and_the_site_show_the_same_quickstart_and_job_type() -> None:
    assert fenced_block(README, "quickstart:start") == fenced_block(QUICKSTART, "quickstart:start")
    module = fenced_block(FIRST_JOB_TYPE, "first-job-type:module")
    assert fenced_block(README, "first-job-type:module") == module
    assert module.startswith("# myjobs/greetings.py\n")


def run_block(script: str, cwd: Path, api: str) -> subprocess.CompletedProcess[str]:
    """Run a page's shell block as a reader would paste it, against this test's stack."""
    bin_dir = Path(sys.executable).parent
    script = script.replace(DOCUMENTED_API, api).replace(".venv/bin/", f"{bin_dir}/")
    # The CLI's default URL is the documented one: point it at this stack instead.
    env = {**os.environ, "CONVEYOR_URL": api}
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_quickstart_and_first_job_type_work_on_make_run(tmp_path: Path) -> None:
    # The reader's checkout: `.conveyor/` beside their own package, as the pages say.
    package = tmp_path / "myjobs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "greetings.py").write_text(fenced_block(FIRST_JOB_TYPE, "first-job-type:module"))
    api_port, flower_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    extra = {"PYTHONPATH": str(tmp_path), "CONVEYOR_JOB_MODULES": '["myjobs.greetings"]'}
    # A first `make run` initialises PostgreSQL: on a busy 2-core machine that takes minutes.
    with devstack(tmp_path / ".conveyor", api_port, flower_port, up_within=240, **extra):
        quick = run_block(fenced_block(README, "quickstart:start"), tmp_path, api)
        assert quick.returncode == 0, quick.stderr
        assert "HTTP/1.1 202" in quick.stdout
        submitted = (tmp_path / "submit.txt").read_text()
        location = next(line for line in submitted.splitlines() if line.startswith("Location:"))
        job_id = location.strip().rsplit("/", 1)[-1]
        lines = quick.stdout.splitlines()
        polls = [json.loads(line) for line in lines if line.startswith("{")]
        # the submit's body, then the poll, both of the same job
        assert [poll["id"] for poll in polls] == [job_id] * 2
        assert polls[-1]["state"] in {"queued", "running", "succeeded"}
        # then the stream, which ended by itself after the job's last state
        streamed = [
            json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")
        ]
        assert {view["id"] for view in streamed} == {job_id}
        assert streamed[-1]["state"] == "succeeded"
        assert streamed[-1]["result"]["slept"] >= 2
        key = json.loads((tmp_path / ".conveyor" / "dev-credentials.json").read_text())["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        url = f"{api}/v1/jobs/{job_id}"
        assert wait_for(lambda: request(url, auth)["state"] == "succeeded", timeout=60)
        assert request(url, auth)["result"]["slept"] >= 2

        tried = run_block(fenced_block(FIRST_JOB_TYPE, "first-job-type:try"), tmp_path, api)
        # The block ends on the submit the page says is refused (exit 1, a 422).
        assert tried.returncode == 1, tried.stderr
        assert '"demo.greet"' in tried.stdout
        assert '"greeting": "hello Ada"' in tried.stdout
        assert "name" in tried.stderr
