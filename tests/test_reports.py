"""The GitHub reports as pure builders: the commit-state rule, and the start-up check that agrees with
what the outbox records, for every phase (a phase added to the enum later is covered at once)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from ephemera.api.models import DESTROYED, Phase, TransitionPhase
from ephemera.github import reports
from tests.test_transitions import EVERY_PHASE, SHA, entering

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def test_a_failure_that_will_be_retried_is_an_error_and_a_permanent_one_a_failure() -> None:
    assert reports.commit_state(Phase.FAILED, permanent=False) == ("error", "Preview environment failed")
    assert reports.commit_state(Phase.FAILED, permanent=True) == ("failure", "Preview environment failed")
    assert reports.commit_state(Phase.READY, permanent=False) == ("success", "Preview environment is ready")
    assert reports.commit_state(Phase.PENDING, permanent=False) is None
    retried = reports.commit_status(entering(Phase.FAILED, url="https://pr-3.example.com/"), "ephemera/preview")
    assert retried is not None
    assert retried.key == f"error@{SHA}"
    assert retried.fields == {
        "state": "error",
        "description": "Preview environment failed",
        "context": "ephemera/preview",
        "target_url": "https://pr-3.example.com/",
    }


def test_a_teardown_cancels_only_a_check_run_still_in_progress() -> None:
    for phase in (Phase.DESTROYING, DESTROYED):
        assert reports.check_run_state(phase, open_run=True) == "cancelled"
        assert reports.check_run_state(phase, open_run=False) is None
    assert reports.check_run_state(Phase.READY, open_run=True) == "success"
    cancelled = reports.check_run(entering(Phase.DESTROYING), "cancelled", NOW)
    assert cancelled.fields["conclusion"] == "cancelled"
    assert cancelled.fields["completed_at"] == NOW
    assert cancelled.fields["output"]["title"] == reports.CHECK_RUN_CANCELLED_TITLE


@pytest.mark.parametrize("permanent", [False, True], ids=["retried", "permanent"])
@pytest.mark.parametrize("phase", EVERY_PHASE, ids=str)
def test_the_startup_check_agrees_with_what_the_outbox_records(phase: TransitionPhase, permanent: bool) -> None:
    t = entering(phase, permanent=permanent)
    owed = reports.commit_status(t, "ephemera/preview") is not None or reports.deployment_state(phase) is not None
    assert reports.reported_is_current(t.status, t.spec) is not owed
    # Everything the outbox records once each report of this state is posted (an App's check run too).
    reported: dict[str, Any] = {"checkRunId": 7, "checkRun": f"success@{'0' * 40}", "comment": reports.comment(t).key}
    if (status := reports.commit_status(t, "ephemera/preview")) is not None:
        reported["commitStatus"] = status.key
    if (check := reports.check_run_state(phase, open_run=False)) is not None:
        reported["checkRun"] = reports.check_run(t, check, NOW).key
    if (deployed := reports.deployment_state(phase)) is not None:
        reported.update(
            deploymentId=9, deploymentSha=SHA, deploymentState=reports.deployment_status(t, deployed, 9).key
        )
    assert reports.reported_is_current({**t.status, "reported": reported}, t.spec)
