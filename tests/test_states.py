"""Unit tests of the job state machine (pure logic)."""

from __future__ import annotations

import pytest

from conveyor.ledger.states import FINISHED, SUBMITTED, TRANSITIONS, JobState, Move, edges


def sources_of(target: JobState) -> set[JobState]:
    return {source for source, to in edges() if to == target and source is not None}


def test_terminal_states_are_exactly_the_four_final_ones() -> None:
    terminal = {s for s in JobState if s.is_terminal}
    assert (
        terminal
        == {
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.EXPIRED,
        }
        == FINISHED
    )


def test_only_a_queued_job_can_be_claimed() -> None:
    assert sources_of(JobState.RUNNING) == {JobState.QUEUED}


def test_only_a_running_job_can_finish_by_itself() -> None:
    assert sources_of(JobState.SUCCEEDED) == {JobState.RUNNING}
    assert sources_of(JobState.FAILED) == {JobState.RUNNING}


def test_every_move_has_an_entry_and_every_state_is_reachable() -> None:
    assert set(TRANSITIONS) == set(Move)
    assert {target for _, target in edges()} == set(JobState)
    assert {JobState.SCHEDULED, JobState.QUEUED} == SUBMITTED


@pytest.mark.parametrize("state", sorted(FINISHED))
def test_only_a_person_takes_a_job_out_of_a_finished_state(state: JobState) -> None:
    leaving = [t for t in TRANSITIONS.values() if state in t.sources]
    expected = [] if state == JobState.SUCCEEDED else [(Move.RETRY, JobState.QUEUED, True)]
    if state == JobState.CANCELLED:
        # Retrying the dependency that cancelled it brings a dependent back to waiting.
        expected.insert(0, (Move.REVIVE, JobState.SCHEDULED, True))
    assert [(t.move, t.target, t.manual) for t in leaving] == expected


def test_a_retrying_job_goes_back_to_the_queue() -> None:
    assert JobState.RETRYING in sources_of(JobState.QUEUED)
    assert JobState.RUNNING in sources_of(JobState.RETRYING)
