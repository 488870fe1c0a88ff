"""Settings: driver URLs rewritten, weak secrets refused in production."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from conveyor.settings import Settings
from tests.conftest import TEST_SECRET_KEY

# Production settings need strong secrets of their own.
STRONG = {
    "secret_key": "s3Kq-9vZ_x1bR7tLmW4yNc2HfJ8dPe6gUa0oTiY5rQ",
    "flower_password": "Xk2-p9Qz_Lm4Rt7w",
}


@pytest.mark.parametrize(
    "url", ["postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"]
)
def test_database_url_gets_the_psycopg_driver(url: str) -> None:
    settings = Settings(database_url=url, secret_key=TEST_SECRET_KEY)
    assert settings.sqlalchemy_url == "postgresql+psycopg://u@h/db"


def test_broker_and_backend_default_to_the_redis_url() -> None:
    settings = Settings(redis_url="redis://r:1/0", secret_key=TEST_SECRET_KEY)
    assert (settings.broker, settings.result_backend) == ("redis://r:1/0", "redis://r:1/0")
    moved = Settings(
        redis_url="redis://r:1/0", broker_url="amqp://mq//", secret_key=TEST_SECRET_KEY
    )
    assert moved.broker == "amqp://mq//"


@pytest.mark.parametrize("secret", ["dev-insecure-secret-change-me", "short-secret", "s" * 40])
def test_production_refuses_default_short_or_repeated_secret(secret: str) -> None:
    with pytest.raises(ValidationError, match="CONVEYOR_SECRET_KEY"):
        Settings(env="production", **{**STRONG, "secret_key": secret})


@pytest.mark.parametrize("password", ["", "pw", "admin-admin-admin-admin"])
def test_production_requires_a_strong_flower_password(password: str) -> None:
    with pytest.raises(ValidationError, match="CONVEYOR_FLOWER_PASSWORD"):
        Settings(env="production", **{**STRONG, "flower_password": password})


def test_production_starts_with_strong_secrets() -> None:
    assert Settings(env="production", **STRONG).env == "production"


def test_settings_come_from_conveyor_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_SECRET_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("CONVEYOR_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("CONVEYOR_JOB_MODULES", '["a.b", "c.d"]')
    settings = Settings()
    assert settings.max_body_bytes == 2048
    assert settings.job_modules == ["a.b", "c.d"]


def test_prepared_statements_can_be_turned_off_for_pgbouncer(settings: Settings) -> None:
    from sqlalchemy import text

    from conveyor.db import create_db_engine

    for enabled, expected in ((True, 5), (False, None)):
        engine = create_db_engine(settings.model_copy(update={"db_prepared_statements": enabled}))
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                assert conn.connection.driver_connection.prepare_threshold == expected
        finally:
            engine.dispose()
