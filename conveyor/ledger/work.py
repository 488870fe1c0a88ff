"""Units of work: one transaction, then the job views it changed and the jobs it queued.

Every write to the ledger happens inside a `UnitOfWork`, opened at the boundary (a request
handler, the task runner, a housekeeping pass) with `Work.begin()`. The ledger's functions
flush, never commit; they note on the unit the live views their writes changed and the
messages of the jobs they queued. When the unit commits, `Work` writes those views to
Redis, publishes those messages, then runs the unit's after-commit callbacks; when it rolls
back, all three are dropped. Commit first, then publish: a worker must never receive an id
it cannot see yet.

A job the unit will publish is written with `published_at` already set (its publish is due
now); if the publish fails, `published_at` is cleared again so the promoter publishes it.
A process that dies between the commit and the publish leaves a stamped job with no
message, which the reconciler finds (DESIGN.md, "The ledger").

`Work.single_statement()` is the fast path for a unit that is one statement (a claim):
autocommit, so neither BEGIN nor COMMIT costs a round trip; one statement is atomic alone.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from conveyor.broker.publisher import Message
from conveyor.errors import PublishFailed
from conveyor.ledger.publishing import unmark_published
from conveyor.live.store import LiveStore, LiveView

logger = logging.getLogger(__name__)


class Publisher(Protocol):
    """Sends job messages to the broker (`conveyor.broker.publisher.CeleryPublisher`)."""

    def publish(self, messages: Iterable[Message], *, redeclare: bool = False) -> None:
        """Send the messages, or raise `PublishFailed`."""


@dataclass
class UnitOfWork:
    """One transaction's session, and what to do once it commits."""

    session: Session
    # The request that opened the unit, carried in its messages for the worker's logs.
    request_id: str | None = None
    views: list[LiveView] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    # Whether the messages' queues must be declared again (the reconciler's re-drives).
    redeclare: bool = False

    @property
    def used(self) -> bool:
        """Return whether the unit's session has begun a database transaction (`Work`'s units)."""
        return bool(self.session.info.get(_USED))

    @classmethod
    def around(cls, session: Session) -> UnitOfWork:
        """Wrap a session whose transaction someone else owns (tests' rolled-back sessions)."""
        return cls(session)

    def show(self, views: Iterable[LiveView]) -> None:
        """Write these live views once the unit commits (the ledger's own business)."""
        self.views.extend(views)

    def publish(self, messages: Iterable[Message], *, redeclare: bool = False) -> None:
        """Publish these jobs' messages once the unit commits (the ledger's own business)."""
        self.messages.extend(messages)
        self.redeclare |= redeclare

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the unit has committed (cache invalidation, notifications)."""
        self.callbacks.append(callback)

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """Run the block in a savepoint; if it fails, forget what it noted too."""
        marks = len(self.views), len(self.messages), len(self.callbacks)
        try:
            with self.session.begin_nested():
                yield
        except BaseException:
            del self.views[marks[0] :], self.messages[marks[1] :], self.callbacks[marks[2] :]
            raise


_USED = "conveyor_used"


def _mark_used(session: Session, *_: Any) -> None:
    session.info[_USED] = True


class Work:
    """Opens units of work on one engine; after each commit, writes views and publishes."""

    def __init__(
        self,
        engine: Engine,
        live: LiveStore | None,
        publisher: Publisher | None = None,
        request_id: Callable[[], str | None] = lambda: None,
    ) -> None:
        # expire_on_commit=False: handlers serialise rows after the commit.
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # A unit that never touched its session has nothing to commit: the task runner
        # then finishes its job in one autocommit statement (`UnitOfWork.used`).
        event.listen(self._sessions, "after_begin", _mark_used)
        self._autocommit = sessionmaker(
            engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        )
        self._snapshots = sessionmaker(
            engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True),
            expire_on_commit=False,
        )
        self._live = live
        self._publisher = publisher
        # The id of the request a unit serves (the API's), carried in its messages.
        self._request_id = request_id

    @property
    def live(self) -> LiveStore | None:
        """Return the store the units' views are written to."""
        return self._live

    @contextlib.contextmanager
    def begin(self) -> Iterator[UnitOfWork]:
        """Open a unit in a transaction: committed when the block ends, rolled back if it raises."""
        with self._sessions.begin() as session:
            unit = UnitOfWork(session, self._request_id() or None)
            yield unit
        self._committed(unit)

    @contextlib.contextmanager
    def single_statement(self) -> Iterator[UnitOfWork]:
        """Open a unit of one statement, in autocommit: atomic alone, no BEGIN or COMMIT."""
        with self._autocommit() as session:
            unit = UnitOfWork(session, self._request_id() or None)
            yield unit
        self._committed(unit)

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """Open an autocommit session for reads (each statement its own consistent snapshot)."""
        with self._autocommit() as session:
            yield session

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Session]:
        """Open a read-only transaction whose statements all see one snapshot (reads that agree)."""
        with self._snapshots.begin() as session:
            yield session

    def _committed(self, unit: UnitOfWork) -> None:
        if unit.views and self._live is not None:
            self._live.write(unit.views)
        if unit.messages:
            self._publish(unit.messages, unit.redeclare)
        for callback in unit.callbacks:
            try:
                callback()
            except Exception:  # the unit committed; a follow-up that fails is logged only
                logger.warning("an after-commit step failed", exc_info=True)

    def _publish(self, messages: list[Message], redeclare: bool) -> None:
        """Publish committed jobs; on failure, clear their `published_at` for the promoter."""
        if self._publisher is None:
            raise RuntimeError("this process queued jobs but has no publisher")
        try:
            self._publisher.publish(messages, redeclare=redeclare)
        except PublishFailed:
            logger.warning("publish of %d jobs failed; the promoter will retry", len(messages))
            self._unstamp([m.job_id for m in messages])

    def _unstamp(self, job_ids: list[uuid.UUID]) -> None:
        try:
            with self.single_statement() as unit:
                unmark_published(unit.session, job_ids)
        except SQLAlchemyError:
            # Stored, not published, and stamped: the reconciler finds no message for them
            # after `reconcile_after` and publishes them then.
            logger.warning("could not clear published_at of %d jobs", len(job_ids), exc_info=True)
