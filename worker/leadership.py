"""Leadership of a beat role: a PostgreSQL advisory lock held on a connection of its own.

A second beat waits, and takes over on its next try once the leader's connection is gone.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, func, select
from sqlalchemy.exc import SQLAlchemyError

from worker.runner import WorkerServices

logger = logging.getLogger(__name__)
# pg_advisory_lock key: "conveyor" in ASCII, so it is unlikely to clash with another app's.
LEADER_LOCK_KEY = 0x636F6E766579


class Leadership:
    """Holds the advisory lock that makes one beat the leader of a role (housekeeping)."""

    def __init__(
        self, services: WorkerServices, key: int = LEADER_LOCK_KEY, role: str = "housekeeping"
    ) -> None:
        self._engine = services.engine
        self._key = key
        self._role = role
        self._conn: Connection | None = None

    def hold(self) -> bool:
        """Keep or take the lead; `False` while another beat holds it."""
        try:
            if self._conn is not None:
                self._conn.execute(select(1))  # still alive, and so is our lock
                return True
            conn = self._engine.connect()
            if conn.execute(select(func.pg_try_advisory_lock(self._key))).scalar():
                conn.commit()
                self._conn = conn
                logger.info("this beat leads %s", self._role)
                return True
            conn.close()
        except SQLAlchemyError:
            logger.warning("lost the database; leadership dropped", exc_info=True)
            self.release()
        return False

    def release(self) -> None:
        """Give up the lead (closing the connection releases the lock)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.invalidate()  # never back to the pool while it may hold the lock
                conn.close()
            except SQLAlchemyError:
                pass
