"""Fixtures of the security regression tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from conveyor.settings import Settings
from tests.processes import process_env

SettingsFromEnv = Callable[..., Settings]


@pytest.fixture
def settings_from_env(monkeypatch: pytest.MonkeyPatch) -> SettingsFromEnv:
    """Return a builder of the Settings a process gets from the test settings' environment.

    Keyword arguments change `CONVEYOR_*` variables (None unsets one); `.env` is ignored.
    """

    def build(settings: Settings, **changes: str | None) -> Settings:
        env: dict[str, str | None] = {**process_env(settings), **changes}
        for name in [n for n in os.environ if n.startswith("CONVEYOR_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("CONVEYOR_") and value is not None:
                monkeypatch.setenv(name, value)
        return Settings(_env_file=None)

    return build
