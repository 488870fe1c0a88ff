"""The job state machine: which transitions exist, as pure data."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Every state a job can be in (DESIGN.md, "The job lifecycle")."""

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
        """Return whether no transition leaves this state."""
        return not TRANSITIONS[self]


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SCHEDULED: frozenset({JobState.QUEUED, JobState.CANCELLED, JobState.EXPIRED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.EXPIRED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.RETRYING, JobState.CANCELLED}
    ),
    JobState.RETRYING: frozenset({JobState.QUEUED, JobState.CANCELLED, JobState.EXPIRED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.EXPIRED: frozenset(),
}


def sources_of(target: JobState) -> frozenset[JobState]:
    """Return the states from which `target` may be entered (for guarded UPDATEs)."""
    return frozenset(src for src, dests in TRANSITIONS.items() if target in dests)


# Terminal states a person may send back to the queue (`POST /v1/jobs/{id}/retry`).
RETRYABLE_BY_HAND = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
# States in which a job has not started yet: cancelled at once, expired when due.
NOT_STARTED = frozenset({JobState.SCHEDULED, JobState.QUEUED, JobState.RETRYING})
