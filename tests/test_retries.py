"""When a Failed environment is due its automatic retry: window, attempts, and jittered backoff; and when
a handler still trying finds its attempt taken over by the automatic retries."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ephemera.api.models import PreviewEnvironmentStatus
from ephemera.config import Settings
from ephemera.retries import retried_later, retry_due, retry_requested, taken_over

FAILED_AT = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
SETTINGS = Settings(retry_backoff=60, retry_window=3600, retry_max_attempts=4)


def _failed(retries: int, **extra: Any) -> dict[str, Any]:
    return {"phase": "Failed", "failedAt": FAILED_AT.isoformat(), "retries": retries, "permanent": False, **extra}


def _after(seconds: float) -> datetime.datetime:
    return FAILED_AT + datetime.timedelta(seconds=seconds)


@given(uid=st.uuids().map(str), retries=st.integers(min_value=0, max_value=3))
def test_a_retry_is_due_by_the_bound_and_stays_due_until_the_window_ends(uid: str, retries: int) -> None:
    bound = min(60 * 2**retries, 3600)
    assert retry_due(_failed(retries), SETTINGS, uid, _after(bound))
    assert retry_due(_failed(retries), SETTINGS, uid, _after(3600))
    assert not retry_due(_failed(retries), SETTINGS, uid, _after(3600.5))


@given(uid=st.uuids().map(str), retries=st.integers(min_value=0, max_value=3), age=st.floats(0, 3600))
def test_once_due_a_retry_stays_due(uid: str, retries: int, age: float) -> None:
    """Every check of one failure draws the same jitter: a later check never takes back a due retry."""
    if retry_due(_failed(retries), SETTINGS, uid, _after(age)):
        assert retry_due(_failed(retries), SETTINGS, uid, _after(min(age + 1, 3600)))


def test_every_check_of_one_failure_gives_the_same_answer() -> None:
    """The jitter is drawn once per object and failure: the job checks every few seconds, and a fresh
    draw at each check would bring the retry early (the earliest of many draws)."""
    for n in range(50):
        answers = {retry_due(_failed(2), SETTINGS, f"uid-{n}", _after(120)) for _ in range(10)}
        assert len(answers) == 1


def test_objects_that_failed_together_are_retried_spread_out() -> None:
    """Full jitter: of 200 environments failed at the same moment, some are due well before the
    plain backoff and some not yet at half of it."""
    due_at_half = [retry_due(_failed(2), SETTINGS, f"uid-{n}", _after(120)) for n in range(200)]
    assert 40 < sum(due_at_half) < 160


def test_no_retry_past_the_attempts_cap_or_of_a_permanent_failure_or_another_phase() -> None:
    assert not retry_due(_failed(4), SETTINGS, "uid", _after(3000))
    assert not retry_due(_failed(0, permanent=True), SETTINGS, "uid", _after(3000))
    assert not retry_due({**_failed(0), "phase": "Ready"}, SETTINGS, "uid", _after(3000))
    assert not retry_due({**_failed(0), "failedAt": None}, SETTINGS, "uid", _after(3000))


def _annotated(request: str | None, handled: str | None = None, **meta: Any) -> dict[str, Any]:
    annotations = {} if request is None else {"ephemera.dev/retry": request}
    return {"metadata": {"name": "pe", "annotations": annotations, **meta}, "status": {"retryRequest": handled}}


def test_a_retry_is_requested_by_a_new_annotation_value_only() -> None:
    assert retry_requested(_annotated("2026-01-01T00:00:00Z")) == "2026-01-01T00:00:00Z"
    assert retry_requested(_annotated("again", handled="before")) == "again"
    assert retry_requested(_annotated("before", handled="before")) is None  # handled already
    assert retry_requested(_annotated(None)) is None
    assert retry_requested(_annotated("")) is None
    assert retry_requested(_annotated("new", deletionTimestamp="2026-01-01T00:00:00Z")) is None
    assert retry_requested({"metadata": {"annotations": None}}) is None


def test_a_failure_is_retried_later_within_the_window_while_attempts_are_left() -> None:
    """What a template rollout leaves to the retry job: due or not yet, it will be provisioned again."""
    assert retried_later(_failed(0), SETTINGS, _after(1))
    assert retried_later(_failed(3), SETTINGS, _after(3600))
    assert not retried_later(_failed(3), SETTINGS, _after(3601))
    assert not retried_later(_failed(4), SETTINGS, _after(1))
    assert not retried_later(_failed(0, permanent=True), SETTINGS, _after(1))
    assert not retried_later({**_failed(0), "phase": "Ready"}, SETTINGS, _after(1))


def _status(phase: str, reason: str, failed: datetime.datetime | None) -> PreviewEnvironmentStatus:
    stamp = failed.isoformat().replace("+00:00", "Z") if failed else None
    return PreviewEnvironmentStatus.model_validate({"phase": phase, "reason": reason, "failedAt": stamp})


@pytest.mark.parametrize(
    ("phase", "reason", "failed", "taken"),
    [
        ("Failed", "Stale", 10, True),  # the sweep's verdict, before the retry job tried
        ("Failed", "NamespaceTerminating", 10, True),  # the retry job tried and failed since: its reason now
        ("Provisioning", "Retry", 10, True),  # the retry job's attempt under way
        ("Failed", "NamespaceTerminating", -10, False),  # failed before this handler began (a push since)
        ("Provisioning", "ManualRetry", -10, False),  # a manual retry's handler, an older failure on record
        ("Updating", "NamespaceTerminating", None, False),  # the handler's own waiting
        ("Updating", "Updating", 10, False),  # the handler's own phase: nobody took it
    ],
)
def test_a_handler_stops_once_the_retry_job_has_taken_its_object(
    phase: str, reason: str, failed: int | None, taken: bool
) -> None:
    """A handler retrying (a namespace still terminating, say) while the stale sweep fails its object:
    the retry job owns it from then on, whatever reason its own attempts have left on it since."""
    began = FAILED_AT
    at = None if failed is None else began + datetime.timedelta(seconds=failed)
    assert taken_over(_status(phase, reason, at), began) is taken
