"""The seam between the state machine and those who mirror it (the records, GitHub, metrics).

After every phase transition the operator calls each registered listener with a `Transition`.
Listeners must return at once (queue the work): a transition is never delayed or failed by them.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ephemera.api.models import TransitionPhase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transition:
    name: str
    uid: str
    generation: int
    spec: dict[str, Any]
    # Typed, so that a listener matches phases by their enum and sees a new phase as one.
    old_phase: TransitionPhase | None
    phase: TransitionPhase
    reason: str
    message: str
    at: str
    status: dict[str, Any]
    created: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    # Announced again after a restart: what was posted for it may not all have been recorded.
    resumed: bool = False
    # When it happened, to the microsecond: `at` (as Kubernetes writes times) has only seconds.
    occurred: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))


Listener = Callable[[Transition], None]


class Transitions:
    """A list of listeners, each called in turn; one that raises is logged and skipped."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish(self, transition: Transition) -> None:
        for listener in self._listeners:
            try:
                listener(transition)
            except Exception:
                log.exception("transition listener %r failed", listener)
