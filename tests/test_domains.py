"""Business domains are plugins: found through entry points, their job types loaded by the API
and the worker alike, their routes registered on what the API lends them."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from conveyor.auth.bootstrap import Identity
from conveyor.plugins import PLATFORM_JOB_MODULES, job_modules, job_registry, load_domains
from conveyor.registry import registry
from conveyor.settings import Settings
from tests.conftest import TEST_SECRET_KEY, in_process_worker, wait_for
from tests.processes import own_queue
from tests.test_e2e import finished, submit

# A domain as a team would ship it, in a package of its own; nothing in api/ or worker/
# names it. Its metadata is what `pip install` / `uv sync` would write for its entry point.
FAKE_DOMAIN = {
    "greetings/__init__.py": """
        from conveyor.plugins import Domain

        domain = Domain(
            name="greetings",
            job_modules=("greetings.jobs",),
            routes="greetings.web:routes",
        )
        """,
    "greetings/jobs.py": """
        from pydantic import BaseModel, ConfigDict

        from conveyor.registry import JobContext, job_type


        class Greeting(BaseModel):
            model_config = ConfigDict(extra="forbid")
            name: str


        @job_type("greetings.greet", payload=Greeting)
        def greet(ctx: JobContext, payload: Greeting) -> dict[str, str]:
            return {"greeting": f"hello {payload.name}"}
        """,
    "greetings/web.py": """
        from flask import jsonify
        from pydantic import BaseModel
        from sqlalchemy import text

        from conveyor.auth.roles import Permission


        class Caller(BaseModel):
            tenant: str
            role: str


        def routes(web):
            bp = web.blueprint("greetings", __name__, description="Greetings, for the tests.")

            @bp.get("/v1/greetings/caller", responses=web.responses({200: Caller}))
            @web.requires(Permission.READ)
            def caller():
                principal = web.principal()
                with web.sessions() as session:
                    tenant = session.scalar(
                        text("SELECT name FROM tenants WHERE id = :id"),
                        {"id": principal.tenant_id},
                    )
                assert web.redis.ping()
                return jsonify(tenant=tenant, role=principal.role.value)

            return bp
        """,
    "greetings-1.0.dist-info/METADATA": """
        Metadata-Version: 2.1
        Name: greetings
        Version: 1.0
        """,
    "greetings-1.0.dist-info/entry_points.txt": """
        [conveyor.domains]
        greetings = greetings:domain
        """,
}


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Install throwaway distributions on `sys.path`; their job types vanish after the test."""
    # The registry is filled by importing modules; this test's types go into a copy of it.
    monkeypatch.setattr(registry, "_types", dict(registry._types))
    before = set(sys.modules)

    def install_files(files: dict[str, str]) -> None:
        for name, text in files.items():
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text).lstrip())
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install_files
    for name in set(sys.modules) - before:
        if name.split(".")[0] == "greetings":
            del sys.modules[name]


def test_the_sample_domain_is_found_through_its_entry_point() -> None:
    (orders,) = (d for d in load_domains() if d.name == "orders")
    assert orders.job_modules == ("domains.orders.jobs",)
    assert orders.migrations is not None
    assert (orders.migrations / "0007_orders.py").is_file()


def test_job_modules_are_the_platforms_every_domains_then_the_extras() -> None:
    # Listing one module used to replace the defaults, dropping webhook delivery and orders.
    settings = Settings(secret_key=TEST_SECRET_KEY, job_modules=["tests.chaos.jobtypes"])
    modules = job_modules(settings, load_domains())
    assert modules == (*PLATFORM_JOB_MODULES, "domains.orders.jobs", "tests.chaos.jobtypes")
    assert job_modules(Settings(secret_key=TEST_SECRET_KEY), load_domains()) == modules[:-1]


def test_an_extra_module_that_cannot_be_imported_is_named() -> None:
    settings = Settings(secret_key=TEST_SECRET_KEY, job_modules=["gone.orders.jobs"])
    with pytest.raises(ImportError, match=r"CONVEYOR_JOB_MODULES lists 'gone.orders.jobs'"):
        job_registry(settings)


def test_an_entry_point_that_is_not_a_domain_is_refused(install: Callable[..., None]) -> None:
    metadata = {k: v for k, v in FAKE_DOMAIN.items() if k.startswith("greetings-1.0.dist-info/")}
    install({**metadata, "greetings/__init__.py": "domain = 'not a Domain'\n"})
    with pytest.raises(TypeError, match="greetings = 'greetings:domain' is not a"):
        load_domains()


@pytest.mark.e2e
def test_an_installed_domain_adds_its_job_types_and_routes_to_a_fresh_api_and_worker(
    install: Callable[..., None],
    make_app: Callable[..., Flask],
    settings: Settings,
    identity: Identity,
    auth: dict[str, str],
) -> None:
    install(FAKE_DOMAIN)
    assert [d.name for d in load_domains()] == ["greetings", "orders"]
    settings = own_queue(settings, "conveyor-test-domain")
    client = make_app(default_queue=settings.default_queue).test_client()

    listed = client.get("/v1/job-types", headers=auth).get_json()
    assert {"greetings.greet", "orders.import_csv"} <= {t["name"] for t in listed["items"]}
    assert client.get("/v1/greetings/caller").status_code == 401
    caller = client.get("/v1/greetings/caller", headers=auth)
    assert caller.status_code == 200, caller.get_json()
    assert caller.get_json() == {"tenant": "Acme", "role": "admin"}
    document: dict[str, Any] = client.get("/openapi.json").get_json()
    operation = document["paths"]["/v1/greetings/caller"]["get"]
    assert (operation["tags"], operation["security"]) == (["greetings"], [{"bearer": []}])

    from worker.app import create_celery_app

    worker = create_celery_app(settings)
    assert "greetings.greet" in worker.tasks
    try:
        with in_process_worker(worker):
            job_id = submit(client, auth, "greetings.greet", {"name": "Ann"})
            done = wait_for(lambda: finished(client, auth, job_id), timeout=30)
    finally:
        worker.conveyor.engine.dispose()
    assert (done["state"], done["result"]) == ("succeeded", {"greeting": "hello Ann"})
