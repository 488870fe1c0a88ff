"""Issue #15, finding 9a: production refuses weak and known secrets, not just short ones."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from conveyor.settings import Settings

FLOWER = "Xk2-p9Qz_Lm4Rt7w-5sV"


@pytest.mark.parametrize(
    "secret",
    [
        "a" * 36,
        "abc" * 12,
        "abc" * 40,
        "0123456789" * 4,
        "dev-insecure-secret-change-me",
        "dev-insecure-secret-change-me-in-production-please",
        "changeme" * 5,
        "secret-9c8a623036d4d96190878d2da924b051",
        "x" * 31 + "y",
    ],
)
def test_production_refuses_weak_or_known_secrets(secret: str) -> None:
    with pytest.raises(ValidationError, match="CONVEYOR_SECRET_KEY"):
        Settings(_env_file=None, env="production", secret_key=secret, flower_password=FLOWER)


@pytest.mark.parametrize(
    "make",
    [
        lambda: secrets.token_urlsafe(32),
        lambda: secrets.token_urlsafe(48),
        lambda: secrets.token_hex(32),
        lambda: base64.b64encode(os.urandom(32)).decode(),  # openssl rand -base64 32
    ],
    ids=["token_urlsafe(32)", "token_urlsafe(48)", "token_hex(32)", "openssl-base64-32"],
)
def test_production_accepts_generated_secrets(make: Callable[[], str]) -> None:
    for _ in range(200):  # generated values vary: every one of them must pass
        secret = make()
        settings = Settings(
            _env_file=None,
            env="production",
            secret_key=secret,
            flower_password=FLOWER,
        )
        assert settings.env == "production"


@pytest.mark.parametrize("password", ["", "admin", "a" * 20, "password1234567890"])
def test_production_refuses_a_weak_flower_password(password: str) -> None:
    with pytest.raises(ValidationError, match="CONVEYOR_FLOWER_PASSWORD"):
        Settings(
            _env_file=None,
            env="production",
            secret_key=secrets.token_urlsafe(32),
            flower_password=password,
        )
