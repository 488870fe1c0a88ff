"""Issue #15, finding 2: no shared default secret signs tokens, and tokens carry every claim.

Before, development (the default, and what the image ran) signed with a constant from the
source, so anyone could mint an admin token; tokens without `exp` or `type` passed.
"""

from __future__ import annotations

import os
import shlex
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.auth.bootstrap import Identity
from conveyor.settings import Settings
from conveyor.telemetry.logs import configure_logging
from tests.conftest import ROOT, bearer
from tests.processes import process_env
from tests.security.conftest import SettingsFromEnv

# The constant every Conveyor install used to sign with, published in the source.
OLD_PUBLIC_DEFAULT = "dev-insecure-secret-change-me"


def claims_for(identity: Identity, **changes: Any) -> dict[str, Any]:
    """Return the claims of an access token for the identity's admin, as the API issues."""
    now = int(time.time())
    claims = {
        "sub": str(identity.user.id),
        "tid": str(identity.tenant.id),
        "fam": str(uuid.uuid4()),
        "type": "access",
        "jti": str(uuid.uuid4()),
        "fresh": False,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    claims.update(changes)
    return claims


@pytest.fixture
def no_data_dir_secret(tmp_path: Path) -> Path:
    """Return an empty data directory: no `secret_key` file in it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return data_dir


@pytest.mark.parametrize("env", ["development", "test", "production"])
def test_no_secret_anywhere_refuses_to_build_settings(
    settings: Settings, settings_from_env: SettingsFromEnv, no_data_dir_secret: Path, env: str
) -> None:
    with pytest.raises(ValidationError, match="set CONVEYOR_SECRET_KEY"):
        settings_from_env(
            settings,
            CONVEYOR_ENV=env,
            CONVEYOR_SECRET_KEY=None,
            CONVEYOR_DATA_DIR=str(no_data_dir_secret),
            CONVEYOR_FLOWER_PASSWORD="Xk2-p9Qz_Lm4Rt7w-5sV",
        )


def test_development_reads_the_data_directorys_secret_and_production_never_does(
    settings: Settings, settings_from_env: SettingsFromEnv, no_data_dir_secret: Path
) -> None:
    secret = "from-the-file-" + uuid.uuid4().hex
    (no_data_dir_secret / "secret_key").write_text(secret + "\n")
    common = {"CONVEYOR_SECRET_KEY": None, "CONVEYOR_DATA_DIR": str(no_data_dir_secret)}
    dev = settings_from_env(settings, CONVEYOR_ENV="development", **common)
    assert dev.secret_key.get_secret_value() == secret
    with pytest.raises(ValidationError, match="set CONVEYOR_SECRET_KEY"):
        settings_from_env(
            settings,
            CONVEYOR_ENV="production",
            CONVEYOR_FLOWER_PASSWORD="Xk2-p9Qz_Lm4Rt7w-5sV",
            **common,
        )


# The old constant is 29 bytes: PyJWT warns about its length when signing with it.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_a_token_signed_with_the_old_public_default_is_refused_in_development(
    settings: Settings,
    settings_from_env: SettingsFromEnv,
    identity: Identity,
    no_data_dir_secret: Path,
) -> None:
    # Development as `make run` leaves it: the secret only in the data directory's file.
    (no_data_dir_secret / "secret_key").write_text(os.urandom(32).hex())
    dev = settings_from_env(
        settings,
        CONVEYOR_ENV="development",
        CONVEYOR_SECRET_KEY=None,
        CONVEYOR_DATA_DIR=str(no_data_dir_secret),
    )
    app = create_app(dev)
    try:
        forged = jwt.encode(claims_for(identity), OLD_PUBLIC_DEFAULT, algorithm="HS256")
        response = app.test_client().get("/v1/me", headers=bearer(forged))
        assert response.status_code == 401, response.get_json()
    finally:
        app.extensions["conveyor"].engine.dispose()
        configure_logging(settings)


@pytest.mark.parametrize("missing", ["exp", "iat", "jti", "type", "sub"])
def test_a_well_signed_token_missing_a_claim_is_401(
    client: Any, settings: Settings, identity: Identity, missing: str
) -> None:
    secret = process_env(settings)["CONVEYOR_SECRET_KEY"]  # the app's real secret
    complete = jwt.encode(claims_for(identity), secret, algorithm="HS256")
    assert client.get("/v1/me", headers=bearer(complete)).status_code == 200
    claims = claims_for(identity)
    del claims[missing]
    token = jwt.encode(claims, secret, algorithm="HS256")
    response = client.get("/v1/me", headers=bearer(token))
    assert response.status_code == 401, response.get_json()


def test_make_run_creates_a_private_random_secret_per_data_directory_and_reuses_it(
    tmp_path: Path,
) -> None:
    from devtools.devstack import ensure_secret_key

    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    old_umask = os.umask(0)  # the mode comes from the open itself, not from the umask
    try:
        first = ensure_secret_key(first_dir)
    finally:
        os.umask(old_umask)
    path = first_dir / "secret_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 48
    assert path.read_text().strip() == first
    assert ensure_secret_key(first_dir) == first  # the next `make run` keeps it
    assert ensure_secret_key(second_dir) != first  # nothing shared between installs


def test_a_saved_dev_key_hashed_under_another_secret_is_replaced(
    committed: None,
    settings: Settings,
    settings_from_env: SettingsFromEnv,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    from conveyor.auth.keys import authenticate_api_key
    from devtools.devstack import ensure_dev_credentials

    path = tmp_path / "dev-credentials.json"
    before, _ = ensure_dev_credentials(settings, path)
    # A new data directory secret: the saved key no longer verifies, so the banner must
    # not print it.
    renewed = settings_from_env(settings, CONVEYOR_SECRET_KEY=os.urandom(32).hex())
    after, created = ensure_dev_credentials(renewed, path)
    assert created
    assert after.api_key != before.api_key
    with sessions.begin() as session:
        principal = authenticate_api_key(
            session,
            process_env(renewed)["CONVEYOR_SECRET_KEY"],
            after.api_key,
            datetime.now(UTC),
        )
    assert str(principal.tenant_id) == after.tenant_id


def image_environment() -> dict[str, str]:
    """Return the `ENV` values of the Dockerfile's last (runtime) stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            env.update(part.split("=", 1) for part in shlex.split(line[4:]) if "=" in part)
    return env


def test_the_image_refuses_to_start_without_a_secret(
    monkeypatch: pytest.MonkeyPatch, no_data_dir_secret: Path
) -> None:
    image = image_environment()
    assert image.get("CONVEYOR_ENV") == "production"
    for name in [n for n in os.environ if n.startswith("CONVEYOR_")]:
        monkeypatch.delenv(name)
    for name, value in image.items():
        if name.startswith("CONVEYOR_"):
            monkeypatch.setenv(name, value)
    # Even with a secret file where the image keeps its data: production never reads it.
    monkeypatch.setenv("CONVEYOR_DATA_DIR", str(no_data_dir_secret))
    (no_data_dir_secret / "secret_key").write_text(os.urandom(32).hex())
    monkeypatch.setenv("CONVEYOR_FLOWER_PASSWORD", "Xk2-p9Qz_Lm4Rt7w-5sV")
    with pytest.raises(ValidationError, match="set CONVEYOR_SECRET_KEY"):
        Settings(_env_file=None)


def test_env_example_carries_no_usable_secret(
    monkeypatch: pytest.MonkeyPatch, no_data_dir_secret: Path
) -> None:
    for name in [n for n in os.environ if n.startswith("CONVEYOR_")]:
        monkeypatch.delenv(name)
    # `cp .env.example .env` and nothing else: no secret to sign with.
    with pytest.raises(ValidationError, match="set CONVEYOR_SECRET_KEY"):
        Settings(_env_file=ROOT / ".env.example", data_dir=str(no_data_dir_secret))
