"""Docker does not run here: check that compose, the Procfile and the Dockerfile agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_TO_PROCFILE = {
    "migrate": "release",
    "api": "web",
    "worker": "worker",
    "beat": "beat",
    "flower": "flower",
}


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_procfile_has_the_five_process_types() -> None:
    assert set(procfile()) == {"release", "web", "worker", "beat", "flower"}


def test_compose_runs_exactly_the_procfile_commands() -> None:
    services = compose()["services"]
    entries = procfile()
    for service, process in COMPOSE_TO_PROCFILE.items():
        shell, flag, command = services[service]["command"]
        assert (shell, flag) == ("sh", "-c")
        # `$$` is compose's escape for a `$` the container's shell expands.
        assert command.replace("$$", "$") == entries[process], service


def test_services_wait_for_healthy_dependencies() -> None:
    services = compose()["services"]
    for name in ("postgres", "redis", "api", "worker"):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat", "flower"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_published_ports_stay_on_loopback() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), name


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert sum(line.startswith("FROM ") for line in lines) >= 2
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in {"root", "0"}


def test_env_example_documents_every_setting() -> None:
    from pydantic import AliasChoices

    from conveyor.settings import Settings

    text = (ROOT / ".env.example").read_text()
    for name, field in Settings.model_fields.items():
        # Settings read from a standard variable (OpenTelemetry's) are documented by it.
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names = [str(choice) for choice in alias.choices]
        else:
            names = [str(alias or f"CONVEYOR_{name.upper()}")]
        assert any(f"{variable}=" in text for variable in names), name
