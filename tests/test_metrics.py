"""Both processes' /metrics: the process and GC collectors, ephemera_build_info, the reconcile duration
histogram, fixed label sets, and Prometheus's naming rules (promtool check metrics, and the same rules
spelled out here)."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from importlib import metadata

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.controlplane import ControlPlane
from devtools.support import Kubectl, Process, post_webhook, wait_for
from ephemera.api.models import TRANSITION_PHASES, Phase
from ephemera.hooks import OUTCOMES as HOOK_OUTCOMES
from ephemera.operator.metrics import HANDLERS, OUTCOMES, reconciled
from ephemera.policy import REFUSALS
from ephemera.webhook.app import ACTION_LABELS, EVENT_LABELS, OUTCOME_LABELS, Metrics, outcome_label
from tests.conftest import WEBHOOK_SECRET
from tests.test_operator import make_env, unique, wait_phase
from tests.test_webhook import pr_event

# The labels of each of Ephemera's metric families, and the values each may take (None: a set owned
# by the GitHub reporter or the records, with its own tests).
PHASES = frozenset(TRANSITION_PHASES)
FIXED_LABELS: dict[str, dict[str, frozenset[str] | None]] = {
    "ephemera_build_info": {"version": None},
    "ephemera_reconciles": {"handler": frozenset(HANDLERS), "outcome": frozenset(OUTCOMES)},
    "ephemera_reconcile_duration_seconds": {"handler": frozenset(HANDLERS)},
    "ephemera_environments": {"phase": PHASES},
    "ephemera_transitions": {"phase": PHASES},
    "ephemera_time_to_ready_seconds": {},
    "ephemera_github_reports": {"kind": None, "outcome": None},
    "ephemera_github_rate_limit_remaining": {},
    "ephemera_github_rate_limit_limit": {},
    "ephemera_operator_active": {},
    "ephemera_handlers_in_flight": {},
    "ephemera_handlers_in_flight_peak": {},
    "ephemera_record_writes": {"outcome": None},
    "ephemera_record_backlog": {},
    "ephemera_record_dead_letters": {"reason": None},
    "ephemera_record_dropped": {},
    "ephemera_record_resyncs": {"outcome": frozenset({"skipped", "run"})},
    "ephemera_backstop_repairs": {"kind": frozenset({"created", "deleted", "torn_down", "redelivered"})},
    "ephemera_backstop_last_success_timestamp_seconds": {},
    "ephemera_webhook_events": {
        "event": EVENT_LABELS | {"other"},
        "action": ACTION_LABELS | {"other", "-"},
        "outcome": OUTCOME_LABELS | {"other"},
    },
    "ephemera_webhook_latency_seconds": {},
    "ephemera_hook_deliveries": {"outcome": frozenset(HOOK_OUTCOMES)},
    "ephemera_webhook_policy_refusals": {"reason": frozenset(REFUSALS) | {"other"}},
    "ephemera_provisions_in_flight": {},
    "ephemera_queue_length": {},
    "ephemera_live_environments": {},
}
UNIT_SUFFIXES = ("_seconds", "_bytes")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def naming_problems(text: str) -> list[str]:
    """Prometheus's naming rules (as promtool's linter checks them) for Ephemera's own metric families."""
    problems = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("ephemera_"):
            continue
        name = family.name
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            problems.append(f"{name}: not snake_case")
        if not family.documentation:
            problems.append(f"{name}: no help text")
        if family.type == "counter":
            bad = [s.name for s in family.samples if not s.name.endswith(("_total", "_created"))]
            problems += [f"{s}: a counter's sample without _total" for s in bad]
        elif name.endswith("_total"):
            problems.append(f"{name}: _total on a {family.type}")
        if family.type == "histogram" and not name.endswith(UNIT_SUFFIXES):
            problems.append(f"{name}: a histogram without its base unit (_seconds, _bytes)")
        if re.search(r"_(ms|milliseconds|minutes|hours|kb|mb|percent)(_|$)", name):
            problems.append(f"{name}: not a base unit")
        # A counter's or histogram's creation time comes as a gauge of its own, with the same labels.
        labels = FIXED_LABELS.get(name) or FIXED_LABELS.get(name.removesuffix("_created"))
        if labels is None:
            problems.append(f"{name}: not in the list of metrics with fixed label sets")
            continue
        for sample in family.samples:
            if set(sample.labels) - {"le"} != set(labels):
                problems.append(f"{sample.name}: labels {sorted(sample.labels)}, not {sorted(labels)}")
            for label, value in sample.labels.items():
                allowed = labels.get(label)
                if allowed is not None and value not in allowed:
                    problems.append(f"{sample.name}: {label}={value!r} is outside its fixed set")
    return problems


def promtool(control_plane: ControlPlane, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(control_plane.bin_dir / "promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )


def common_series(text: str) -> None:
    """What both processes export beside their own metrics."""
    version = metadata.version("ephemera")
    assert f'ephemera_build_info{{version="{version}"}} 1.0' in text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "python_info"):
        assert re.search(rf"^{name}[{{ ]", text, re.MULTILINE), name
    assert "python_gc_collections_total" in text


@pytest.fixture(scope="module")
def operator_metrics(operator: Process, kubectl: Kubectl) -> str:
    name = unique("metrics")
    kubectl.apply(make_env(name, 118))
    wait_phase(kubectl, name, "Ready")
    # The Ready gauge comes from a timer every 10 s: wait for it, so that every kind of series is there.
    wait_for(
        lambda: re.search(r'ephemera_environments\{phase="Ready"\} [1-9]', scrape(operator.port)),
        timeout=30,
        what="the phase gauge",
    )
    return scrape(operator.port)


@pytest.fixture(scope="module")
def webhook_metrics(webhook: Process) -> str:
    event = pr_event("opened", repo="octo/promtool", number=1, sha="1" * 40, updated_at="2026-01-01T00:00:00Z")
    assert post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET).status == 202
    assert post_webhook(webhook.port, "pull_request", event, secret="not-the-secret").status == 401
    return scrape(webhook.port)


def test_operator_exports_process_gc_build_info_and_reconcile_durations(operator_metrics: str) -> None:
    common_series(operator_metrics)
    for handler in HANDLERS:
        assert f'ephemera_reconcile_duration_seconds_count{{handler="{handler}"}}' in operator_metrics
        for outcome in OUTCOMES:
            assert f'ephemera_reconciles_total{{handler="{handler}",outcome="{outcome}"}}' in operator_metrics
    provisions = re.search(r'ephemera_reconcile_duration_seconds_count\{handler="provision"\} (\S+)', operator_metrics)
    assert provisions is not None
    assert float(provisions.group(1)) >= 1
    for phase in Phase:
        assert f'ephemera_environments{{phase="{phase.value}"}}' in operator_metrics
    # The session's operator runs alone (no peering): it is the active replica, and says so.
    assert re.search(r"^ephemera_operator_active 1\.0$", operator_metrics, re.MULTILINE)


def test_webhook_exports_process_gc_and_build_info(webhook_metrics: str) -> None:
    common_series(webhook_metrics)
    assert 'ephemera_webhook_events_total{action="opened",event="pull_request",outcome="created"}' in webhook_metrics


@pytest.mark.parametrize("which", ["operator", "webhook"])
def test_metrics_follow_prometheus_naming(which: str, request: pytest.FixtureRequest) -> None:
    text: str = request.getfixturevalue(f"{which}_metrics")
    assert naming_problems(text) == []


@pytest.mark.parametrize("which", ["operator", "webhook"])
def test_promtool_check_metrics_passes(which: str, control_plane: ControlPlane, request: pytest.FixtureRequest) -> None:
    text: str = request.getfixturevalue(f"{which}_metrics")
    result = promtool(control_plane, text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_promtool_and_the_naming_rules_catch_a_badly_named_metric(control_plane: ControlPlane) -> None:
    bad = (
        "# HELP ephemera_latency_ms Time taken.\n# TYPE ephemera_latency_ms histogram\n"
        'ephemera_latency_ms_bucket{le="+Inf"} 1\nephemera_latency_ms_count 1\nephemera_latency_ms_sum 1\n'
        "# HELP ephemera_requests Requests.\n# TYPE ephemera_requests counter\nephemera_requests 1\n"
    )
    result = promtool(control_plane, bad)
    assert result.returncode != 0
    assert "ephemera_requests" in result.stdout + result.stderr
    assert any("not a base unit" in p for p in naming_problems(bad))


def test_labels_outside_the_fixed_sets_are_refused_or_folded() -> None:
    with pytest.raises(ValueError, match="fixed labels"):
        reconciled("some-new-handler", "success", time.perf_counter())
    with pytest.raises(ValueError, match="fixed labels"):
        reconciled("provision", "exploded", time.perf_counter())
    assert outcome_label("http_418") == "other"
    metrics = Metrics()
    metrics.delivery("x" * 200, "made-up", "http_599", 0.01)
    text = "\n".join(
        f"{s.name}{s.labels}" for f in metrics.registry.collect() for s in f.samples if s.name.startswith("ephemera_")
    )
    assert "'event': 'other'" in text
    assert "'action': 'other'" in text
    assert "'outcome': 'other'" in text
