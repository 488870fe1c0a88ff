"""Unit tests of the job state machine (pure logic)."""

from __future__ import annotations

import pytest

from conveyor.states import TRANSITIONS, JobState, sources_of


def test_terminal_states_are_exactly_the_four_final_ones() -> None:
    terminal = {s for s in JobState if s.is_terminal}
    assert terminal == {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.EXPIRED,
    }


def test_only_a_queued_job_can_be_claimed() -> None:
    assert sources_of(JobState.RUNNING) == {JobState.QUEUED}


def test_only_a_running_job_can_finish() -> None:
    assert sources_of(JobState.SUCCEEDED) == {JobState.RUNNING}
    assert sources_of(JobState.FAILED) == {JobState.RUNNING}


def test_every_state_has_a_transition_entry() -> None:
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize("state", [s for s in JobState if s.is_terminal])
def test_nothing_leaves_a_terminal_state(state: JobState) -> None:
    assert all(state not in sources_of(target) for target in JobState)


def test_a_retrying_job_goes_back_to_the_queue() -> None:
    assert JobState.RETRYING in sources_of(JobState.QUEUED)
    assert JobState.RUNNING in sources_of(JobState.RETRYING)
