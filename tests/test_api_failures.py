"""The API when its dependencies fail: durable accept, 503s, and no traceback for a 500."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.models import Job
from conveyor.settings import Settings
from tests.conftest import TEST_SECRET_KEY
from tests.test_api import assert_problem
from worker.flower import flower_environment

DEAD_REDIS = SecretStr("redis://127.0.0.1:1/0")


def test_broker_down_at_submit_still_accepts_the_job_durably(
    settings: Settings, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    app = create_app(settings.model_copy(update={"broker_url": DEAD_REDIS}))
    response = app.test_client().post("/v1/jobs", json={"type": "system.noop"}, headers=auth)
    assert response.status_code == 202
    with sessions() as session:
        job = session.get_one(Job, uuid.UUID(response.get_json()["id"]))
    # Unconfirmed publish: the promoter (tested end to end) re-publishes it.
    assert (job.state, job.published_at) == ("queued", None)
    app.extensions["conveyor"].engine.dispose()


@pytest.fixture
def broken_app(settings: Settings, tmp_path: Any) -> Any:
    broken = settings.model_copy(
        update={
            "database_url": SecretStr(f"postgresql://postgres@/nowhere?host={tmp_path}"),
            "redis_url": DEAD_REDIS,
        }
    )
    return create_app(broken)


def test_readiness_names_each_failed_dependency(broken_app: Any) -> None:
    response = broken_app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"] == {
        "database": "unavailable",
        "broker": "unavailable",
        "result_backend": "unavailable",
    }
    assert broken_app.test_client().get("/healthz").status_code == 200


def test_database_down_is_a_503_with_retry_after(broken_app: Any) -> None:
    response = broken_app.test_client().post(
        "/v1/jobs",
        json={"type": "system.noop"},
        headers={"Authorization": "Bearer cvk_0123456789ab_secret"},
    )
    body = assert_problem(response, 503)
    assert response.headers["Retry-After"] == "5"
    assert (body["type"], body["title"]) == (
        "https://conveyor.dev/problems/unavailable",
        "Service unavailable",
    )
    assert body["detail"] == "the database is unavailable; try again"
    assert "nowhere" not in str(body)


def test_an_unexpected_error_is_a_bare_500(app: Any) -> None:
    def explode() -> None:
        raise RuntimeError("SELECT secret FROM internals")

    app.add_url_rule("/explode", view_func=explode)
    response = app.test_client().get("/explode")
    body = assert_problem(response, 500)
    assert "SELECT" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)
    assert body["title"] == "Internal error"


def test_flower_gets_auth_and_persistence_from_settings(tmp_path: Any) -> None:
    env = flower_environment(
        Settings(
            secret_key=TEST_SECRET_KEY,
            flower_password="pw",
            data_dir=str(tmp_path / "d"),
            flower_port=5999,
        )
    )
    assert env["FLOWER_BASIC_AUTH"] == "admin:pw"
    assert env["FLOWER_PORT"] == "5999"
    assert env["FLOWER_PERSISTENT"] == "true"
    assert env["FLOWER_DB"] == str(tmp_path / "d" / "flower.db")
    assert (tmp_path / "d").is_dir()


def test_flower_refuses_to_start_without_a_password_outside_development() -> None:
    with pytest.raises(SystemExit, match="refusing"):
        flower_environment(Settings(env="test", secret_key=TEST_SECRET_KEY, flower_password=""))


def test_a_nul_character_is_a_422_and_writes_nothing(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    body = {"type": "system.fail", "payload": {"message": "a\u0000b"}}
    problem = assert_problem(client.post("/v1/jobs", json=body, headers=auth), 422)
    assert (problem["type"], problem["title"]) == (
        "https://conveyor.dev/problems/unstorable-data",
        "Unstorable data",
    )
    with sessions() as session:
        assert session.query(Job).count() == 0


def test_problem_responses_keep_their_protocol_headers(client: Any) -> None:
    not_allowed = client.delete("/healthz")
    assert "GET" in not_allowed.headers["Allow"]
    assert client.get("/v1/me").headers["WWW-Authenticate"] == "Bearer"


def test_a_dead_broker_is_one_publish_failed(settings: Settings) -> None:
    import uuid as _uuid

    from conveyor.broker.config import create_celery
    from conveyor.broker.publisher import CeleryPublisher, Message
    from conveyor.errors import PublishFailed

    dead = settings.model_copy(update={"broker_url": DEAD_REDIS})
    publisher = CeleryPublisher(create_celery(dead, name="dead"))
    with pytest.raises(PublishFailed, match="the broker did not take the messages"):
        publisher.publish([Message(_uuid.uuid4(), "system.noop", "q")])
