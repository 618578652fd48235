"""Prometheus metrics of the operator.

Every label takes its values from a fixed set named here, and every series of those sets exists from
the start (at zero), so that dashboards and alerts see them before the first event."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

from ephemera.api.models import TRANSITION_PHASES, Phase, parse_time
from ephemera.metrics import REGISTRY
from ephemera.transitions import Transition

HANDLERS = ("provision", "update", "resume", "destroy")
OUTCOMES = ("success", "retry", "failure", "handed-over")

RECONCILES = Counter(
    "ephemera_reconciles",
    "Handler runs, by handler and outcome (success, retry, failure, handed-over).",
    ["handler", "outcome"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "ephemera_reconcile_duration_seconds",
    "Time of one handler run (one attempt), by handler.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ENVIRONMENTS = Gauge(
    "ephemera_environments",
    "PreviewEnvironments by phase, as the operator sees them.",
    ["phase"],
    registry=REGISTRY,
)
TIME_TO_READY = Histogram(
    "ephemera_time_to_ready_seconds",
    "From the object's creation to its first Ready.",
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
    registry=REGISTRY,
)
ACTIVE = Gauge(
    "ephemera_operator_active",
    "1 while this replica is the active one (it runs the operator-wide jobs and sets the phase gauge); 0 on a "
    "standby, or when it cannot tell (the API server does not answer).",
    registry=REGISTRY,
)
HANDLERS_IN_FLIGHT = Gauge(
    "ephemera_handlers_in_flight",
    "Lifecycle handler runs (provision, update, resume, destroy) under way now; each object's run in its "
    "own kopf worker, so at most EPHEMERA_WORKER_LIMIT.",
    registry=REGISTRY,
)
HANDLERS_IN_FLIGHT_PEAK = Gauge(
    "ephemera_handlers_in_flight_peak",
    "The most lifecycle handler runs under way at once since the operator started: at EPHEMERA_WORKER_LIMIT, "
    "objects have waited for a worker.",
    registry=REGISTRY,
)
TRANSITIONS = Counter("ephemera_transitions", "Phase transitions, by the phase entered.", ["phase"], registry=REGISTRY)

for _handler in HANDLERS:
    RECONCILE_DURATION.labels(_handler)
    for _outcome in OUTCOMES:
        RECONCILES.labels(_handler, _outcome)
for _phase in Phase:
    ENVIRONMENTS.labels(_phase.value)
# The phases a transition enters: the object's phases, and Destroyed (the object is gone).
for _entered in TRANSITION_PHASES:
    TRANSITIONS.labels(_entered)


def reconciled(handler: str, outcome: str, started: float) -> None:
    """Count a handler run that began at `started` (time.perf_counter()) and time it.

    A handler or outcome outside the fixed sets is a programming error, refused here rather than
    exported as a new series."""
    if handler not in HANDLERS or outcome not in OUTCOMES:
        raise ValueError(f"reconcile metrics take fixed labels: handler {handler!r}, outcome {outcome!r}")
    RECONCILES.labels(handler, outcome).inc()
    RECONCILE_DURATION.labels(handler).observe(time.perf_counter() - started)


class _InFlight:
    """Counts handler runs under way and keeps the peak (handlers run in kopf's threads and on the loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = 0
        self._peak = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            self._now += 1
            self._peak = max(self._peak, self._now)
            HANDLERS_IN_FLIGHT.set(self._now)
            HANDLERS_IN_FLIGHT_PEAK.set(self._peak)
        try:
            yield
        finally:
            with self._lock:
                self._now -= 1
                HANDLERS_IN_FLIGHT.set(self._now)


# `with handling():` around one handler run.
handling = _InFlight()


def observe_transition(transition: Transition) -> None:
    """A transition listener: counts transitions and times the first Ready."""
    TRANSITIONS.labels(transition.phase.value).inc()
    if transition.phase is Phase.READY and transition.old_phase is Phase.PROVISIONING:
        created, ready = parse_time(transition.created), parse_time(transition.at)
        if created and ready:
            TIME_TO_READY.observe(max(0.0, (ready - created).total_seconds()))
