"""Transitions carry a typed phase, and every listener (records, GitHub reports, metrics) takes every phase.

The phases come from the enums themselves, so a phase added to `Phase` later is covered here at once."""

from __future__ import annotations

import dataclasses
import datetime
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from ephemera.api.models import DESTROYED, TRANSITION_PHASES, Phase, RecordPhase, TransitionPhase, parse_phase
from ephemera.github.reports import comment_body, marker, reported_is_current
from ephemera.metrics import REGISTRY
from ephemera.operator.metrics import observe_transition
from ephemera.store.engine import make_engine, upgrade
from ephemera.store.records import Records
from ephemera.transitions import Transition

EVERY_PHASE = list(TRANSITION_PHASES.values())
SHA = "c" * 40


def entering(
    phase: TransitionPhase, *, uid: str = "uid-1", old: TransitionPhase | None = Phase.PROVISIONING, **status: Any
) -> Transition:
    """A transition of `octo/phases#3` into `phase`, its status holding `status` besides the phase."""
    at = "2026-01-01T00:00:02Z"
    return Transition(
        name="pr-3-octo-phases",
        uid=uid,
        generation=1,
        spec={"repository": "octo/phases", "pullRequest": 3, "commitSha": SHA},
        old_phase=old,
        phase=phase,
        reason=f"Entered{phase.value}",
        message=f"now {phase.value}",
        at=at,
        status={"phase": phase.value, "namespace": "pr-3-octo-phases-x", **status},
        created="2026-01-01T00:00:00Z",
        occurred=datetime.datetime.fromisoformat(at.replace("Z", "+00:00")),
    )


def test_every_phase_reads_back_as_its_member_and_an_unknown_one_is_refused() -> None:
    assert DESTROYED is RecordPhase.DESTROYED
    assert set(TRANSITION_PHASES.values()) == {*Phase, *RecordPhase}
    for phase in EVERY_PHASE:
        assert parse_phase(phase.value) is phase
    with pytest.raises(ValueError, match="unknown phase 'Paused'"):
        parse_phase("Paused")


@pytest.mark.parametrize("phase", EVERY_PHASE, ids=str)
def test_metrics_count_every_phase_under_its_own_label(phase: TransitionPhase) -> None:
    def count() -> float:
        return REGISTRY.get_sample_value("ephemera_transitions_total", {"phase": phase.value}) or 0.0

    before = count()
    observe_transition(entering(phase))
    assert count() == before + 1


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A records database (SQLite) at the current schema."""
    path = tmp_path / "records.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.mark.parametrize("phase", EVERY_PHASE, ids=str)
async def test_records_keep_every_phase(phase: TransitionPhase, database: Path) -> None:
    records = Records(make_engine(f"sqlite+aiosqlite:///{database}"))
    first = entering(Phase.PROVISIONING, old=None)
    await records.write(
        dataclasses.replace(first, at="2026-01-01T00:00:01Z", occurred=first.occurred.replace(second=1))
    )
    await records.write(entering(phase))
    await records.engine.dispose()
    with sqlite3.connect(database) as db:
        row = db.execute("SELECT phase, destroyed_at FROM environment").fetchone()
        events = db.execute("SELECT from_phase, to_phase FROM environment_event ORDER BY at").fetchall()
    assert row[0] == phase.value
    assert (row[1] is not None) == (phase is DESTROYED)
    expected = [(None, "Provisioning")] + ([] if phase is Phase.PROVISIONING else [("Provisioning", phase.value)])
    assert events == expected


@pytest.mark.parametrize("phase", EVERY_PHASE, ids=str)
def test_the_pr_comment_and_the_startup_check_take_every_phase(phase: TransitionPhase) -> None:
    t = entering(phase)
    body = comment_body(t)
    assert body.startswith(marker("octo/phases", 3))
    assert f"**{phase.value}**" in body
    # Nothing reported yet: a phase that some report shows is owed, one that none shows is not.
    assert isinstance(reported_is_current({"phase": phase.value}, t.spec), bool)
