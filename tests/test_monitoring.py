"""The chart's monitoring pieces: metrics Services, ServiceMonitor/PodMonitor, the PrometheusRule and
the Grafana dashboard.

The alerts and the dashboard's queries are parsed by promtool (the Prometheus's own PromQL parser:
`promtool check rules`, and `promtool promql label-matchers set`, which marks every vector selector of
an expression so that its metric names can be read off), and every metric they name must be one that
the operator and the webhook, started against the local control plane, really export on /metrics.
`promtool test rules` then feeds the alerts series and checks when they fire.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.support import Process
from ephemera.webhook.app import SERVER_ERROR_OUTCOMES
from tests.test_chart import NAMESPACE, template
from tests.test_metrics import scrape

CHART = REPO_ROOT / "charts" / "ephemera"
RUNBOOKS = REPO_ROOT / "docs" / "runbooks.md"
DASHBOARD = CHART / "dashboards" / "ephemera.json"
ALL_MONITORING = [
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.prometheusRule.enabled=true",
    "--set", "metrics.dashboard.enabled=true",
]  # fmt: skip
ALERTS = {
    "EphemeraEnvironmentsFailed",
    "EphemeraRecordBacklogGrowing",
    "EphemeraGitHubRateLimitLow",
    "EphemeraWebhookErrors",
    "EphemeraNoActiveOperator",
    "EphemeraTimeToReadySlow",
}
# A label no expression uses, set on every selector to find them (see the module docstring).
MARK = "zz_selector_mark"
# prometheus-operator's Duration pattern (monitoring.coreos.com/v1).
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
# Grafana's variables, given values PromQL can parse.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$namespace": NAMESPACE}


def docs(control_plane: ControlPlane, *args: str) -> dict[str, dict[str, Any]]:
    rendered = template(control_plane, *args).stdout
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(rendered) if d}


def promtool(control_plane: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(control_plane.bin_dir / "promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def metric_names(control_plane: ControlPlane, expr: str) -> set[str]:
    """The metric names of every vector selector of `expr`, as Prometheus's parser sees them."""
    result = promtool(control_plane, "--experimental", "promql", "label-matchers", "set", expr, MARK, "1")
    assert result.returncode == 0, f"{expr}\n{result.stderr}"
    marked = result.stdout
    names = re.findall(rf'([a-zA-Z_:][a-zA-Z0-9_:]*)\{{[^{{}}]*\b{MARK}="1"', marked)
    assert len(names) == marked.count(f'{MARK}="1"'), f"a selector without a metric name in {expr}"
    return set(names)


def exported(text: str) -> set[str]:
    """Every series name a /metrics output can have: its samples, and those its declared families make."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def exported_names(operator: Process, webhook: Process) -> set[str]:
    """What the session's operator and webhook (real processes on the local control plane) export."""
    return exported(scrape(operator.port)) | exported(scrape(webhook.port))


def rules(control_plane: ControlPlane, *args: str) -> list[dict[str, Any]]:
    rule = docs(control_plane, "--set", "metrics.prometheusRule.enabled=true", *args)["PrometheusRule/ephemera"]
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return [r for group in groups for r in group["rules"]]


def test_monitoring_objects_render_only_when_enabled(control_plane: ControlPlane) -> None:
    defaults = docs(control_plane)
    assert not [k for k in defaults if k.split("/")[0] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")]
    assert "ConfigMap/ephemera-dashboard" not in defaults
    # The metrics Services are there by default: Prometheus needs something to find.
    assert {"Service/ephemera-operator-metrics", "Service/ephemera-webhook-metrics"} <= set(defaults)
    everything = docs(control_plane, *ALL_MONITORING)
    assert {"ServiceMonitor/ephemera", "PrometheusRule/ephemera", "ConfigMap/ephemera-dashboard"} <= set(everything)
    pods = docs(control_plane, "--set", "metrics.podMonitor.enabled=true")
    assert "PodMonitor/ephemera" in pods
    assert "ServiceMonitor/ephemera" not in pods


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (["metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true"], "choose one"),
        (["metrics.serviceMonitor.enabled=true", "metrics.service.enabled=false"], "needs metrics.service.enabled"),
        (["metrics.serviceMonitor.interval=often"], "interval"),
    ],
)
def test_contradictory_monitoring_values_are_refused(
    control_plane: ControlPlane, values: list[str], complaint: str
) -> None:
    result = template(control_plane, *[a for v in values for a in ("--set", v)], check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's verdict on a set of labels (matchLabels, and matchExpressions with In)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_the_service_monitor_selects_both_metrics_services_on_their_metrics_port(control_plane: ControlPlane) -> None:
    found = docs(
        control_plane,
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
        "--set", "metrics.serviceMonitor.relabelings[0].targetLabel=cluster",
        "--set", "metrics.serviceMonitor.relabelings[0].replacement=east",
    )  # fmt: skip
    monitor = found["ServiceMonitor/ephemera"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) == {"jobLabel", "namespaceSelector", "selector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = spec["endpoints"]
    assert set(endpoint) == {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    assert DURATION.match(endpoint["interval"])
    assert DURATION.match(endpoint["scrapeTimeout"])
    assert endpoint["relabelings"] == [{"targetLabel": "cluster", "replacement": "east"}]
    selected = {
        name
        for name, doc in found.items()
        if name.startswith("Service/") and selects(spec["selector"], doc["metadata"]["labels"])
    }
    assert selected == {"Service/ephemera-operator-metrics", "Service/ephemera-webhook-metrics"}
    for name in selected:
        service = found[name]["spec"]
        [port] = [p for p in service["ports"] if p["name"] == endpoint["port"]]
        # ...and each Service sends that port to the container port its process serves /metrics on.
        deployment = found[f"Deployment/ephemera-{found[name]['metadata']['labels']['app.kubernetes.io/component']}"]
        pod = deployment["spec"]["template"]
        assert selects({"matchLabels": service["selector"]}, pod["metadata"]["labels"])
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert port["targetPort"] in ports
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert str(ports[port["targetPort"]]) in (env.get("EPHEMERA_OPERATOR_PORT"), env.get("EPHEMERA_WEBHOOK_PORT"))


def test_the_pod_monitor_selects_the_operator_and_webhook_pods(control_plane: ControlPlane) -> None:
    found = docs(control_plane, "--set", "metrics.podMonitor.enabled=true", "--set", "metrics.podMonitor.interval=1m")
    spec = found["PodMonitor/ephemera"]["spec"]
    assert set(spec) == {"jobLabel", "namespaceSelector", "selector", "podMetricsEndpoints"}
    [endpoint] = spec["podMetricsEndpoints"]
    assert endpoint["interval"] == "1m"
    assert endpoint["path"] == "/metrics"
    selected = []
    for name, doc in found.items():
        if name.startswith(("Deployment/", "Pod/")):
            pod = doc["spec"]["template"]
            if selects(spec["selector"], pod["metadata"]["labels"]):
                selected.append(name)
                assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert sorted(selected) == ["Deployment/ephemera-operator", "Deployment/ephemera-webhook"]


def test_every_alert_expression_parses(control_plane: ControlPlane, tmp_path: Path) -> None:
    rule = docs(control_plane, "--set", "metrics.prometheusRule.enabled=true")["PrometheusRule/ephemera"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} == ALERTS
    group_file = tmp_path / "rules.yaml"
    group_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = promtool(control_plane, "check", "rules", str(group_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_refuses_a_broken_alert(control_plane: ControlPlane, tmp_path: Path) -> None:
    """The check above would catch an expression Prometheus cannot parse."""
    group_file = tmp_path / "rules.yaml"
    broken = {"alert": "Broken", "expr": "sum(rate(ephemera_transitions_total[5m])"}
    group_file.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [broken]}]}))
    assert promtool(control_plane, "check", "rules", str(group_file)).returncode != 0


def test_alerts_name_only_metrics_the_processes_export(control_plane: ControlPlane, exported_names: set[str]) -> None:
    named: dict[str, set[str]] = {r["alert"]: metric_names(control_plane, r["expr"]) for r in rules(control_plane)}
    assert all(named.values()), named
    unknown = {alert: names - exported_names for alert, names in named.items() if names - exported_names}
    assert not unknown, f"alerts name metrics no process exports: {unknown}"


def test_the_metric_name_check_catches_a_metric_nobody_exports(
    control_plane: ControlPlane, exported_names: set[str]
) -> None:
    names = metric_names(control_plane, 'sum(rate(ephemera_environments_failed_total{namespace="x"}[5m])) > 0')
    assert names == {"ephemera_environments_failed_total"}
    assert not names <= exported_names


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_its_runbook_section(control_plane: ControlPlane) -> None:
    anchors = {github_slug(line.lstrip("#")) for line in RUNBOOKS.read_text().splitlines() if line.startswith("## ")}
    base = "https://runbooks.example.com/ephemera/runbooks.md"
    for rule in rules(control_plane, "--set", f"metrics.prometheusRule.runbookUrl={base}"):
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == base, url
        assert anchor == github_slug(rule["alert"]), url
        assert anchor in anchors, f"docs/runbooks.md has no section for {rule['alert']}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_alert_thresholds_are_values(control_plane: ControlPlane) -> None:
    found = {
        r["alert"]: r
        for r in rules(
            control_plane,
            "--set", "metrics.prometheusRule.timeToReadyObjective=120",
            "--set", "metrics.prometheusRule.failedFor=30m",
            "--set-json", "metrics.prometheusRule.rateLimitRemainingRatio=0.2",
            "--set", "metrics.prometheusRule.alertLabels.team=platform",
        )
    }  # fmt: skip
    assert found["EphemeraTimeToReadySlow"]["expr"].rstrip().endswith("> 120")
    assert found["EphemeraEnvironmentsFailed"]["for"] == "30m"
    assert found["EphemeraGitHubRateLimitLow"]["expr"].rstrip().endswith("< 0.2")
    assert all(r["labels"]["team"] == "platform" for r in found.values())
    # Every selector is limited to the release's namespace.
    for rule in found.values():
        marked = promtool(control_plane, "--experimental", "promql", "label-matchers", "set", rule["expr"], MARK, "1")
        selectors = re.findall(r"\{[^{}]*\}", marked.stdout)
        assert selectors
        assert all(f'namespace="{NAMESPACE}"' in s for s in selectors if MARK in s), rule["alert"]


def test_the_webhook_5xx_alert_counts_the_outcomes_answered_5xx(control_plane: ControlPlane) -> None:
    [rule] = [r for r in rules(control_plane) if r["alert"] == "EphemeraWebhookErrors"]
    match = re.search(r'outcome=~"([^"]+)"', rule["expr"])
    assert match is not None
    assert set(match.group(1).split("|")) == SERVER_ERROR_OUTCOMES


def test_alerts_fire_when_they_should(control_plane: ControlPlane, tmp_path: Path) -> None:
    """promtool's rule unit tests: series in, the alerts that fire (and do not) out."""
    group_file = tmp_path / "rules.yaml"
    rule = docs(control_plane, "--set", "metrics.prometheusRule.enabled=true")["PrometheusRule/ephemera"]
    groups = rule["spec"]["groups"]
    for alert in (r for group in groups for r in group["rules"]):
        del alert["annotations"]  # when alerts fire is judged here; their texts by the tests above
    group_file.write_text(yaml.safe_dump({"groups": groups}))
    ns = f'namespace="{NAMESPACE}"'
    active, standby = f'{ns},pod="op-a"', f'{ns},pod="op-b"'
    tests = {
        "rule_files": [str(group_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                # One environment Failed on the active replica from minute 10; the standby's stale gauge
                # has said 3 all along, and must not count.
                "interval": "1m",
                "input_series": [
                    {"series": f'ephemera_environments{{phase="Failed",{active}}}', "values": "0x9 1x30"},
                    {"series": f'ephemera_environments{{phase="Failed",{standby}}}', "values": "3x40"},
                    {"series": f"ephemera_operator_active{{{active}}}", "values": "1x40"},
                    {"series": f"ephemera_operator_active{{{standby}}}", "values": "0x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "EphemeraEnvironmentsFailed", "exp_alerts": []},
                    {
                        "eval_time": "26m",
                        "alertname": "EphemeraEnvironmentsFailed",
                        "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                    },
                    {"eval_time": "20m", "alertname": "EphemeraNoActiveOperator", "exp_alerts": []},
                ],
            },
            {
                # No replica active (both standbys), then none scraped at all.
                "interval": "1m",
                "input_series": [
                    {"series": f"ephemera_operator_active{{{active}}}", "values": "0x10 _x20"},
                    {"series": f"ephemera_operator_active{{{standby}}}", "values": "0x10 _x20"},
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "EphemeraNoActiveOperator", "exp_alerts": []},
                    {
                        "eval_time": "8m",
                        "alertname": "EphemeraNoActiveOperator",
                        "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": NAMESPACE}}],
                    },
                    {
                        "eval_time": "28m",
                        "alertname": "EphemeraNoActiveOperator",
                        "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": NAMESPACE}}],
                    },
                ],
            },
            {
                # The backlog grows for 40 minutes; on another replica it stays 0. The rate limit falls
                # from 5000 to 100 of 5000 (below 10% from minute 46).
                "interval": "1m",
                "input_series": [
                    {"series": f"ephemera_record_backlog{{{active}}}", "values": "0+5x40"},
                    {"series": f"ephemera_record_backlog{{{standby}}}", "values": "0x40"},
                    {"series": f"ephemera_github_rate_limit_remaining{{{active}}}", "values": "5000-100x49 100x20"},
                    {"series": f"ephemera_github_rate_limit_limit{{{active}}}", "values": "5000x70"},
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "EphemeraRecordBacklogGrowing", "exp_alerts": []},
                    {
                        "eval_time": "35m",
                        "alertname": "EphemeraRecordBacklogGrowing",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "pod": "op-a"}}],
                    },
                    {"eval_time": "40m", "alertname": "EphemeraGitHubRateLimitLow", "exp_alerts": []},
                    {
                        "eval_time": "55m",
                        "alertname": "EphemeraGitHubRateLimitLow",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "pod": "op-a"}}],
                    },
                ],
            },
            {
                # 10 deliveries a minute, of which 2 answered 503 from minute 10 on (20%), and 1 of
                # them refused with 401 (a 4xx, not counted).
                "interval": "1m",
                "input_series": [
                    {"series": f'ephemera_webhook_events_total{{outcome="created",{ns}}}', "values": "0+7x40"},
                    {"series": f'ephemera_webhook_events_total{{outcome="http_401",{ns}}}', "values": "0+1x40"},
                    {
                        "series": f'ephemera_webhook_events_total{{outcome="unavailable",{ns}}}',
                        "values": "0+2x10 20+0x5 20+2x25",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "14m", "alertname": "EphemeraWebhookErrors", "exp_alerts": []},
                    {
                        "eval_time": "38m",
                        "alertname": "EphemeraWebhookErrors",
                        "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                    },
                ],
            },
            {
                # Environments Ready in 30 s, then from minute 30 in 10 minutes (above 300 s).
                "interval": "1m",
                "input_series": [
                    {"series": f'ephemera_time_to_ready_seconds_bucket{{le="60",{ns}}}', "values": "0+10x30 300x60"},
                    {"series": f'ephemera_time_to_ready_seconds_bucket{{le="300",{ns}}}', "values": "0+10x30 300x60"},
                    {
                        "series": f'ephemera_time_to_ready_seconds_bucket{{le="1800",{ns}}}',
                        "values": "0+10x30 300+10x60",
                    },
                    {
                        "series": f'ephemera_time_to_ready_seconds_bucket{{le="+Inf",{ns}}}',
                        "values": "0+10x30 300+10x60",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "EphemeraTimeToReadySlow", "exp_alerts": []},
                    {
                        "eval_time": "80m",
                        "alertname": "EphemeraTimeToReadySlow",
                        "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                    },
                ],
            },
        ],
    }
    test_file = tmp_path / "tests.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    result = promtool(control_plane, "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Each panel's PromQL queries, by title (rows hold no query), and the template variables' queries."""
    queries: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            if inner["type"] != "row":
                queries[inner["title"]] = [t["expr"] for t in inner["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])
            assert match is not None, variable
            queries[f"${variable['name']}"] = [match.group(1)]
    return queries


def without_grafana_variables(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def test_every_dashboard_query_names_metrics_the_processes_export(
    control_plane: ControlPlane, exported_names: set[str]
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 15
    assert all(queries.values()), [title for title, exprs in queries.items() if not exprs]
    unknown: dict[str, set[str]] = {}
    used: set[str] = set()
    for title, exprs in queries.items():
        for expr in exprs:
            names = metric_names(control_plane, without_grafana_variables(expr))
            used |= names
            if names - exported_names:
                unknown[title] = names - exported_names
    assert not unknown, f"dashboard panels name metrics no process exports: {unknown}"
    # Every metric an alert watches is on the dashboard too.
    alerted = set().union(*(metric_names(control_plane, r["expr"]) for r in rules(control_plane)))
    assert alerted <= used, alerted - used


def test_the_dashboard_ships_as_a_configmap_for_grafanas_sidecar(control_plane: ControlPlane) -> None:
    found = docs(
        control_plane,
        "--set", "metrics.dashboard.enabled=true",
        "--set", "metrics.dashboard.namespace=monitoring",
        "--set", "metrics.dashboard.annotations.grafana_folder=Ephemera",
    )  # fmt: skip
    config_map = found["ConfigMap/ephemera-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Ephemera"}
    assert json.loads(config_map["data"]["ephemera.json"]) == json.loads(DASHBOARD.read_text())
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ephemera"
    # Every panel reads the data source chosen in the dashboard, not one named by a Grafana install.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
