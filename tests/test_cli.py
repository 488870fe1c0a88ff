"""`conveyor create-tenant`: what operators and `make run` use to create a tenant."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conveyor.cli import main
from conveyor.settings import Settings
from tests.conftest import bearer


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch, committed: None) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CONVEYOR_SECRET_KEY", settings.secret_key)


def test_create_tenant_prints_a_working_admin_and_key(
    cli_env: None, client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["create-tenant", "--name", "Initech", "--email", "Boss@Example.com"]
    assert main([*argv, "--key-role", "operator"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["email"] == "boss@example.com"
    me = client.get("/v1/me", headers=bearer(created["api_key"])).get_json()
    assert (me["role"], me["tenant_id"]) == ("operator", created["tenant_id"])
    login = {"email": "boss@example.com", "password": created["password"]}
    assert client.post("/v1/auth/login", json=login).status_code == 200
    # The same email again is refused, with a message and a non-zero status.
    assert main(argv) == 1
    assert "already registered" in capsys.readouterr().err
