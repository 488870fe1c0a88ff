"""The job state machine as pure data: every move a job can make, manual ones included.

The ledger derives each transition's guarded statement from this table (which states it
may leave, which one it enters), so a move that is not here cannot be written.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class JobState(StrEnum):
    """Every state a job can be in (DESIGN.md, "The ledger")."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        """Return whether the job has finished: no worker or timer moves it again."""
        return self in FINISHED


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
# States in which a job has not started yet: cancelled at once, expired when due.
NOT_STARTED = frozenset({JobState.SCHEDULED, JobState.QUEUED, JobState.RETRYING})
UNFINISHED = NOT_STARTED | {JobState.RUNNING}


class Waiting(StrEnum):
    """Why a job that could otherwise run has not started (its view's `waiting_for`)."""

    SCHEDULE = "schedule"  # its run time, or its retry's backoff, has not come
    PAUSE = "pause"  # its queue is paused, for its tenant or for everyone
    LIMIT = "limit"  # a limit it counts against has no room (running or rate)
    FAIR_SHARE = "fair_share"  # its queue is busy: the dispatcher hands out work by turns
    DEPENDENCIES = "dependencies"  # jobs it depends on have not succeeded yet


class Move(StrEnum):
    """A named transition; the ledger has one guarded statement per move."""

    PROMOTE = "promote"  # a delay or backoff is over
    CLAIM = "claim"  # a worker takes the job for one attempt
    SUCCEED = "succeed"
    BACK_OFF = "back_off"  # an attempt failed; another follows after a backoff
    FAIL = "fail"  # an attempt failed and none remains
    STOP = "stop"  # a running job stopped (or was terminated) on a cancel request
    CANCEL = "cancel"  # a person cancelled a job that had not started
    EXPIRE = "expire"  # a job did not start before its expiry
    RETRY = "retry"  # a person sent a dead job back to the queue
    # A dependency ended dead: the job that waited for it will never run (unless it asked to).
    ABANDON = "abandon"
    # A person retried the dependency that cancelled this job: it waits for it again.
    REVIVE = "revive"


@dataclass(frozen=True)
class Transition:
    """Which states a move leaves, and the one it enters."""

    move: Move
    sources: frozenset[JobState]
    target: JobState
    # A person's act (through the API), as opposed to the platform's own.
    manual: bool = False


def _t(move: Move, sources: set[JobState], target: JobState, *, manual: bool = False) -> Transition:
    return Transition(move, frozenset(sources), target, manual)


TRANSITIONS: dict[Move, Transition] = {
    t.move: t
    for t in (
        _t(Move.PROMOTE, {JobState.SCHEDULED, JobState.RETRYING}, JobState.QUEUED),
        _t(Move.CLAIM, {JobState.QUEUED}, JobState.RUNNING),
        _t(Move.SUCCEED, {JobState.RUNNING}, JobState.SUCCEEDED),
        _t(Move.BACK_OFF, {JobState.RUNNING}, JobState.RETRYING),
        _t(Move.FAIL, {JobState.RUNNING}, JobState.FAILED),
        _t(Move.STOP, {JobState.RUNNING}, JobState.CANCELLED),
        _t(Move.CANCEL, set(NOT_STARTED), JobState.CANCELLED, manual=True),
        _t(Move.EXPIRE, set(NOT_STARTED), JobState.EXPIRED),
        _t(Move.ABANDON, {JobState.SCHEDULED}, JobState.CANCELLED),
        _t(Move.REVIVE, {JobState.CANCELLED}, JobState.SCHEDULED, manual=True),
        _t(
            Move.RETRY,
            {JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED},
            JobState.QUEUED,
            manual=True,
        ),
    )
}
# The states a submit may create a job in (an insert, not a move).
SUBMITTED = frozenset({JobState.SCHEDULED, JobState.QUEUED})


def edges() -> frozenset[tuple[JobState | None, JobState]]:
    """Return every (from, to) pair the ledger may record, submits included."""
    moves = {(source, t.target) for t in TRANSITIONS.values() for source in t.sources}
    return frozenset(moves | {(None, state) for state in SUBMITTED})
