"""The client and the `conveyor` CLI against the live app with a real worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from conveyor.cli import main
from conveyor.client import Client, ConflictError, NotFoundError, ValidationError
from conveyor.settings import Settings
from tests.conftest import bearer


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch, committed: None) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", settings.database_url.get_secret_value())
    monkeypatch.setenv("CONVEYOR_SECRET_KEY", settings.secret_key.get_secret_value())


def test_create_tenant_prints_a_working_admin_and_key(cli_env: None, client: Any) -> None:
    runner = CliRunner()
    argv = ["create-tenant", "--name", "Initech", "--email", "Boss@Example.com"]
    result = runner.invoke(main, [*argv, "--key-role", "operator"])
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    assert created["email"] == "boss@example.com"
    me = client.get("/v1/me", headers=bearer(created["api_key"])).get_json()
    assert (me["role"], me["tenant_id"]) == ("operator", created["tenant_id"])
    login = {"email": "boss@example.com", "password": created["password"]}
    assert client.post("/v1/auth/login", json=login).status_code == 200
    again = runner.invoke(main, argv)
    assert again.exit_code == 1
    assert "already registered" in again.output


@pytest.fixture
def api(app: Any, identity: Any) -> Iterator[Client]:
    """A client wired to the in-process app (real database, broker and worker)."""
    with Client(
        "http://conveyor.test", identity.token, transport=httpx.WSGITransport(app=app)
    ) as c:
        yield c


@pytest.mark.e2e
def test_the_client_submits_waits_lists_and_raises_typed_errors(worker: Any, api: Client) -> None:
    job = api.submit("system.sleep", {"seconds": 0.3}, tags=["client"])
    updates: list[str] = []
    done = api.wait(job["id"], on_update=lambda j: updates.append(j["state"]))
    assert done["state"] == "succeeded"
    assert updates[-1] == "succeeded"
    assert [j["id"] for j in api.jobs(tag="client")] == [job["id"]]
    with pytest.raises(ValidationError) as bad:
        api.submit("system.sleep", {"seconds": -1})
    assert bad.value.errors[0]["field"] == "payload.seconds"
    with pytest.raises(NotFoundError):
        api.get("00000000-0000-0000-0000-000000000000")
    with pytest.raises(ConflictError):
        api.retry(job["id"])
    key = api.create_key("ci", "viewer")
    assert key["key"].startswith("cvk_")
    assert [k["name"] for k in api.list_keys()] == ["ci", "Acme admin key"]


@pytest.mark.e2e
def test_cli_submit_wait_prints_the_result(worker: Any, api: Client) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["submit", "system.sleep", "--payload", '{"seconds": 0.2}', "--wait"],
        obj={"client": api},
    )
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert (job["state"], job["result"]["slept"] >= 0.2) == ("succeeded", True)
    listed = runner.invoke(main, ["list", "--limit", "5"], obj={"client": api})
    assert job["id"] in listed.output
    status = runner.invoke(main, ["status", job["id"]], obj={"client": api})
    assert json.loads(status.stdout)["id"] == job["id"]
    failed = runner.invoke(
        main,
        ["submit", "system.fail", "--payload", '{"message": "nope"}', "--wait"],
        obj={"client": api},
    )
    assert failed.exit_code == 1
    assert '"message": "nope"' in failed.output
    empty = runner.invoke(main, ["schedules", "list"], obj={"client": api})
    assert json.loads(empty.stdout) == []


def test_cli_sets_limits_and_pauses_queues(
    api: Client, settings: Settings, cli_env: None, sessions: Any
) -> None:
    runner = CliRunner()

    def run(*argv: str) -> Any:
        result = runner.invoke(main, list(argv), obj={"client": api})
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout) if result.stdout.strip() else None

    limit = run("limits", "set", "stripe", "--max-running", "5", "--per-second", "10")
    assert (limit["key"], limit["max_running"], limit["per_second"]) == ("stripe", 5, 10.0)
    assert run("limits", "get", "stripe")["running"] == 0
    assert [item["key"] for item in run("limits", "list")] == ["stripe"]
    job = run("submit", "system.noop", "--limit-key", "stripe", "--unique-key", "once")
    assert job["waiting_for"] == "limit"
    assert run("limits", "get", "stripe")["waiting"] == 1
    assert run("submit", "system.noop", "--unique-key", "once")["id"] == job["id"]
    run("limits", "delete", "stripe")
    assert run("limits", "list") == []
    queue = settings.default_queue
    assert run("queues", "pause", queue) == {"queue": queue, "paused": True}
    assert run("queues", "resume", queue) == {"queue": queue, "paused": False}
    # For the whole deployment: straight in the database, as operators do.
    run("queues", "pause", queue, "--all-tenants")
    shown = {q["name"]: q["paused"] for q in run("queues", "list")["queues"]}
    assert shown[queue] is True
    run("queues", "resume", queue, "--all-tenants")
    shown = {q["name"]: q["paused"] for q in run("queues", "list")["queues"]}
    assert shown.get(queue, False) is False
