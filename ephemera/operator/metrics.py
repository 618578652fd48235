"""Prometheus metrics of the operator."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ephemera.metrics import REGISTRY
from ephemera.models import parse_time
from ephemera.transitions import Transition

RECONCILES = Counter(
    "ephemera_reconciles",
    "Handler runs, by handler and outcome (success, retry, failure).",
    ["handler", "outcome"],
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
TRANSITIONS = Counter("ephemera_transitions", "Phase transitions, by the phase entered.", ["phase"], registry=REGISTRY)


def observe_transition(transition: Transition) -> None:
    """A transition listener: counts transitions and times the first Ready."""
    TRANSITIONS.labels(transition.phase).inc()
    if transition.phase == "Ready" and transition.old_phase == "Provisioning":
        created, ready = parse_time(transition.created), parse_time(transition.at)
        if created and ready:
            TIME_TO_READY.observe(max(0.0, (ready - created).total_seconds()))
