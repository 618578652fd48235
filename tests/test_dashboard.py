"""`ephemera dashboard` in a real browser: Debian's chromium, driven by Selenium through Debian's
chromedriver (hack/install-chromium.sh; no browser is downloaded), against the session's control
plane, its operator and its PostgreSQL records.

The pages' contents are computed by pure functions (ephemera/dashboard/views.py), checked first
without a browser. Set UPDATE_SCREENSHOT=1 to write the list page's screenshot to docs/dashboard.png.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from devtools.controlplane import REPO_ROOT, ControlPlane, free_port, write_token_kubeconfig
from devtools.fakegithub import FakeGitHub
from devtools.postgres import Postgres
from devtools.support import Kubectl, Process, process_env, wait_for
from ephemera.dashboard import views
from ephemera.dashboard.app import CSP, templates
from tests.conftest import http_ok
from tests.test_chart_env import CHART, EVERY_OPTION, helm, image_env, rendered_containers
from tests.test_github import INSTALLATION

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"
# How long the browser waits for a condition on the page (the operator's reconcile included).
PAGE_TIMEOUT = 60
HOLD = "example.com/dashboard-test-hold"
UTC = datetime.UTC
TEMPLATE: dict[str, Any] = {
    "apiVersion": "ephemera.dev/v1alpha1",
    "kind": "PreviewTemplate",
    "metadata": {"name": "dashboard-test-previews"},
    "spec": {"repositories": ["octo/dash-*"], "url": "https://{{ host }}/"},
}


# What the pages show, without a browser.


def test_pr_links_go_to_the_web_side_of_the_github_in_use() -> None:
    assert views.github_web_url("https://api.github.com") == "https://github.com"
    assert views.github_web_url("https://github.example.com/api/v3/") == "https://github.example.com"


@pytest.mark.parametrize(
    ("url", "link"),
    [
        ("https://pr-1.preview.example.com/", "https://pr-1.preview.example.com/"),
        ("http://localhost:8080/x", "http://localhost:8080/x"),
        ("javascript:alert(1)", None),
        ("JaVaScRiPt:alert(1)", None),
        ("data:text/html,<script>alert(1)</script>", None),
        ("//evil.example.com/", None),
        ("", None),
        (None, None),
    ],
)
def test_only_http_urls_become_links(url: str | None, link: str | None) -> None:
    assert views.safe_link(url) == link


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert views.percentile(values, 50) == 50.0
    assert views.percentile(values, 95) == 95.0
    assert views.percentile([7.0], 95) == 7.0
    assert views.percentile([], 50) is None


def test_time_to_ready_keeps_the_last_day_and_charts_it_by_hour() -> None:
    now = datetime.datetime(2026, 11, 29, 12, 30, tzinfo=UTC)
    samples = [
        (now - datetime.timedelta(hours=30), 500.0),  # older than a day: left out
        (now - datetime.timedelta(hours=2), 10.0),
        (now - datetime.timedelta(hours=2), 20.0),
        (now - datetime.timedelta(minutes=5), 4.0),
    ]
    ready = views.ready_times(samples, now)
    assert (ready.count, ready.p50, ready.p95) == (3, 10.0, 20.0)
    assert [b.count for b in ready.buckets if b.count] == [2, 1]
    assert ready.chart is not None
    assert len(ready.chart.p95_points.split()) == 2
    assert ready.chart.top == 20.0
    assert views.ready_times([], now).chart is None


def test_operator_figures_are_read_from_its_metrics() -> None:
    text = (
        "# TYPE ephemera_github_rate_limit_remaining gauge\nephemera_github_rate_limit_remaining 4711.0\n"
        "# TYPE ephemera_record_backlog gauge\nephemera_record_backlog 3.0\n"
    )
    assert views.operator_figures(text) == views.OperatorFigures(4711.0, 3.0, None)
    unknown = views.operator_figures(text.replace("4711.0", "-1.0"))
    assert unknown.rate_limit_remaining is None  # no GitHub answer yet
    assert views.operator_figures("").error


def test_a_row_carries_what_the_list_shows() -> None:
    now = datetime.datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    obj = {
        "metadata": {"name": "pr-7-octo-shop-1", "creationTimestamp": "2026-11-29T11:50:00Z"},
        "spec": {"repository": "octo/shop", "pullRequest": 7, "title": "<b>x</b>", "branch": "b"},
        "status": {
            "phase": "Ready",
            "reason": "Provisioned",
            "url": "javascript:alert(1)",
            "lastTransitionTime": "2026-11-29T11:59:00Z",
        },
    }
    row = views.environment_row(obj, "https://github.com", now)
    assert row.pr_url == "https://github.com/octo/shop/pull/7"
    assert (row.phase, row.age, row.last_transition_age, row.url) == ("Ready", "10m", "60s", None)
    assert row.title == "<b>x</b>"  # escaped by the template, not here
    assert views.environment_row({"metadata": {"name": "n"}}, "", now).phase == "Pending"


def test_every_page_renders_an_object_that_has_only_its_required_fields() -> None:
    """Optional fields (author, title, conditions' reasons) may be missing: the page shows `-`."""
    now = datetime.datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    obj = {
        "metadata": {"name": "pr-1-octo-shop-1"},
        "spec": {"repository": "octo/shop", "pullRequest": 1, "commitSha": "a" * 40, "branch": "b"},
        "status": {"phase": "Failed", "conditions": [{"type": "Ready", "status": "False"}]},
    }
    pages = templates()
    context = views.environment_page("pr-1-octo-shop-1", obj, "https://github.com", now)
    page = pages.get_template("environment.html").render(
        version="0", path="/", **context, history=[], records_error=None, events=[], events_error=None
    )
    assert "<dt>Author</dt><dd>-</dd>" in page
    gone = views.environment_page("pr-1-octo-shop-1", None, "https://github.com", now)
    assert "No PreviewEnvironment of this name exists now" in pages.get_template("environment.html").render(
        version="0", path="/", **gone, history=[], records_error=None, events=[], events_error=None
    )
    rows = views.rows([obj], "https://github.com", now, repository="", phase="")
    assert 'data-phase="Failed"' in pages.get_template("_rows.html").render(rows=rows)


# The page in a browser.


@pytest.fixture(scope="module")
def dashboard(
    operator: Process,
    control_plane: ControlPlane,
    kubectl: Kubectl,
    postgres: Postgres,
    github: FakeGitHub,
    tmp_path_factory: Any,
) -> Iterator[Process]:
    """`ephemera dashboard` as in production: its own process and port, reading the session's
    cluster, the operator's records (PostgreSQL) and the operator's /metrics."""
    tmp = tmp_path_factory.mktemp("dashboard")
    # The module's repositories get a preview URL (a template without objects: a namespace and a URL).
    kubectl.apply(TEMPLATE)
    env = process_env(
        control_plane.kubeconfig,
        tmp,
        EPHEMERA_DATABASE_URL=postgres.url,
        EPHEMERA_DASHBOARD_PORT=str(free_port()),
        EPHEMERA_DASHBOARD_OPERATOR_METRICS_URL=f"http://127.0.0.1:{operator.port}/metrics",
        EPHEMERA_GITHUB_API_URL=github.url(""),
    )
    proc = Process(["dashboard"], env, tmp / "dashboard.log", int(env["EPHEMERA_DASHBOARD_PORT"])).start()
    wait_for(lambda: http_ok(proc, "/healthz"), timeout=60, what="dashboard /healthz")
    yield proc
    proc.stop()
    kubectl.run("delete", "previewtemplate", TEMPLATE["metadata"]["name"], "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Debian's chromium and chromium-driver are not installed: run hack/install-chromium.sh as root")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    yield driver
    driver.quit()


def base(dashboard: Process) -> str:
    return f"http://127.0.0.1:{dashboard.port}"


def until(browser: WebDriver, what: str, condition: Any) -> Any:
    return WebDriverWait(browser, PAGE_TIMEOUT, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def row(browser: WebDriver, name: str) -> dict[str, str] | None:
    """The list's row of `name` as the page shows it now, read in one script: the rows are replaced
    whenever the list changes, so elements found one call earlier may be gone the next."""
    found: dict[str, str] | None = browser.execute_script(
        """
        const row = document.querySelector(`#rows tr[data-name="${arguments[0]}"]`);
        if (!row) return null;
        return {
            phase: row.dataset.phase,
            repository: row.querySelector(".repository").textContent,
            title: row.querySelector(".title").textContent,
            link: row.querySelector(".pr a").href,
            preview: row.querySelector(".url").textContent.trim(),
            markup: row.innerHTML,
        };
        """,
        name,
    )
    return found


def phase_of(browser: WebDriver, name: str) -> str | None:
    found = row(browser, name)
    return found["phase"] if found else None


def live(browser: WebDriver) -> bool:
    return browser.find_element(By.ID, "live").get_attribute("data-state") == "live"


def environment(name: str, repo: str, number: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ephemera.dev/v1alpha1",
        "kind": "PreviewEnvironment",
        "metadata": {"name": name},
        "spec": {
            "repository": repo,
            "pullRequest": number,
            "commitSha": uuid.uuid4().hex + "0" * 8,
            "branch": "feature/dashboard",
            "installationId": INSTALLATION,
            **spec,
        },
    }


def set_finalizers(kubectl: Kubectl, namespace: str, finalizers: list[str] | None) -> None:
    kubectl.run(
        "patch", "namespace", namespace, "--type=merge", "-p", json.dumps({"metadata": {"finalizers": finalizers}})
    )


def test_the_list_shows_a_new_environment_and_follows_its_phase_without_a_reload(
    dashboard: Process, browser: WebDriver, kubectl: Kubectl
) -> None:
    repo = f"octo/dash-{uuid.uuid4().hex[:6]}"
    name = f"dash-live-{uuid.uuid4().hex[:6]}"
    browser.get(f"{base(dashboard)}/?repository={repo}")
    until(browser, "the event stream to connect", live)
    assert row(browser, name) is None
    # A reload would lose this: it proves that every change below reached the page through the stream.
    browser.execute_script("window.sameDocument = true;")

    kubectl.apply(environment(name, repo, 11, title="Add the live list"))
    until(browser, f"{name} in the list", lambda d: row(d, name))
    until(browser, f"{name} Ready in the list", lambda d: phase_of(d, name) == "Ready")
    shown = row(browser, name)
    assert shown is not None
    assert shown["repository"] == repo
    assert shown["link"].endswith(f"/{repo}/pull/11")
    assert shown["preview"] == f"https://{kubectl.json('get', 'pe', name)['status']['namespace']}.preview.localhost/"
    assert browser.execute_script("return window.sameDocument === true;")

    # A namespace held by a finalizer keeps the teardown in Destroying until the test lets it go.
    namespace = kubectl.json("get", "pe", name)["status"]["namespace"]
    set_finalizers(kubectl, namespace, [HOLD])
    kubectl.run("delete", "pe", name, "--wait=false")
    until(browser, f"{name} Destroying in the list", lambda d: phase_of(d, name) == "Destroying")
    set_finalizers(kubectl, namespace, None)
    until(browser, f"{name} gone from the list", lambda d: row(d, name) is None)
    assert browser.execute_script("return window.sameDocument === true;")

    # Its history, from the records: every transition in order, with its time and reason.
    def transitions(d: WebDriver) -> list[str] | bool:
        d.get(f"{base(dashboard)}/environments/{name}")
        cells = [c.text for c in d.find_elements(By.CSS_SELECTOR, "table.transitions tbody tr td:nth-child(3)")]
        return cells if "Destroyed" in cells else False

    phases = until(browser, f"{name}'s history up to Destroyed", transitions)
    assert phases[-1] == "Destroyed"
    for phase in ("Provisioning", "Ready", "Destroying"):
        assert phase in phases, phases
    assert phases.index("Ready") < phases.index("Destroying") < phases.index("Destroyed")
    first = browser.find_element(By.CSS_SELECTOR, "table.transitions tbody tr")
    cells = [c.text for c in first.find_elements(By.TAG_NAME, "td")]
    assert datetime.datetime.strptime(cells[0], "%Y-%m-%d %H:%M:%S")  # a time
    assert cells[3], cells  # a reason


def test_a_pr_title_holding_a_script_renders_as_text(
    dashboard: Process, browser: WebDriver, kubectl: Kubectl, github: FakeGitHub, tmp_path: Path
) -> None:
    repo = f"octo/dash-{uuid.uuid4().hex[:6]}"
    name = f"dash-xss-{uuid.uuid4().hex[:6]}"
    title = '<script>window.pwned = "script"</script><img src=x onerror="window.pwned = \'img\'">'
    branch = "feature/<svg onload=alert(1)>"
    kubectl.apply(environment(name, repo, 12, title=title, branch=branch))
    browser.get(f"{base(dashboard)}/?repository={repo}")
    until(browser, f"{name} Ready in the list", lambda d: phase_of(d, name) == "Ready")
    shown = row(browser, name)
    assert shown is not None
    assert shown["title"] == title
    assert "<script" not in shown["markup"]
    assert "<img" not in shown["markup"]
    assert browser.execute_script("return window.pwned === undefined;")

    browser.get(f"{base(dashboard)}/environments/{name}")
    assert browser.find_element(By.CSS_SELECTOR, ".summary .title").text == title
    assert browser.find_element(By.CSS_SELECTOR, ".summary .branch").text == branch
    assert not browser.find_elements(By.CSS_SELECTOR, "main script, main img, main svg")
    assert browser.execute_script("return window.pwned === undefined;")
    # Its Events and what was reported to GitHub for its Ready. Not the first reports shown: a Provisioning
    # that lasts past the reporter's settling second is reported (and shown) before the Ready is.
    until(
        browser,
        "the environment's Events and the GitHub reports of its Ready",
        lambda d: (
            d.refresh()
            or (
                d.find_elements(By.CSS_SELECTOR, "table.events tbody tr:not(.empty)")
                and "Ready@" in d.find_element(By.CSS_SELECTOR, "table.reports").text
            )
        ),
    )
    assert browser.save_screenshot(str(tmp_path / "environment.png"))

    with urllib.request.urlopen(f"{base(dashboard)}/environments/{name}", timeout=10) as answer:
        headers, page = answer.headers, answer.read().decode()
    assert headers["Content-Security-Policy"] == CSP
    assert "script-src 'self'" in CSP
    assert "unsafe-inline" not in CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "&lt;script&gt;" in page
    assert "<script>window" not in page
    kubectl.run("delete", "pe", name, "--wait=false")


def test_the_totals_page_counts_phases_times_failures_and_the_operators_figures(
    dashboard: Process, browser: WebDriver, kubectl: Kubectl, github: FakeGitHub, tmp_path: Path
) -> None:
    repo = f"octo/dash-{uuid.uuid4().hex[:6]}"
    ready, failed = f"dash-ready-{uuid.uuid4().hex[:6]}", f"dash-failed-{uuid.uuid4().hex[:6]}"
    kubectl.apply(environment(ready, repo, 21, title="Totals: one Ready"))
    # More CPU than EPHEMERA_MAX_CPU allows: Failed for good, with its reason.
    kubectl.apply(environment(failed, repo, 22, title="Totals: one Failed", resources={"cpu": "64"}))
    wait_for(lambda: phase(kubectl, ready) == "Ready" and phase(kubectl, failed) == "Failed", timeout=90, what="phases")
    reason = kubectl.json("get", "pe", failed)["status"]["reason"]

    def totals(d: WebDriver) -> bool:
        d.get(f"{base(dashboard)}/totals")
        failures = d.find_element(By.CSS_SELECTOR, "table.failures").text
        return reason in failures and int(d.find_element(By.ID, "ready-count").text) >= 1

    until(browser, "the Ready and the failure in the totals", totals)
    assert int(browser.find_element(By.CSS_SELECTOR, 'td[data-phase="Failed"]').text) >= 1
    assert int(browser.find_element(By.CSS_SELECTOR, 'td[data-phase="Ready"]').text) >= 1
    assert browser.find_element(By.ID, "ready-p50").text.endswith(" s")
    assert browser.find_element(By.ID, "ready-p95").text.endswith(" s")
    chart = browser.find_element(By.ID, "ready-chart")
    assert chart.find_elements(By.TAG_NAME, "polyline")
    # The operator's figures: its record backlog, and the rate limit of the local GitHub's last answer.
    assert browser.find_element(By.ID, "backlog").text.isdigit()
    until(browser, "the GitHub rate limit", lambda d: d.refresh() or d.find_element(By.ID, "rate-limit").text.isdigit())
    assert browser.save_screenshot(str(tmp_path / "totals.png"))

    browser.get(f"{base(dashboard)}/")
    until(browser, "the list", lambda d: row(d, ready) and row(d, failed))
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, SCREENSHOT)
    for name in (ready, failed):
        kubectl.run("delete", "pe", name, "--wait=false")


def phase(kubectl: Kubectl, name: str) -> str | None:
    result = kubectl.run("get", "pe", name, "-o", "jsonpath={.status.phase}", check=False)
    return result.stdout or None


def test_the_dashboard_serves_nothing_but_reads(dashboard: Process) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        request = urllib.request.Request(f"{base(dashboard)}/", data=b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{base(dashboard)}/environments/no-such-environment", timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(f"{base(dashboard)}/environments/a,b=c", timeout=10)
    assert bad.value.code == 404


def test_pages_say_what_they_cannot_read_and_show_the_rest(
    dashboard: Process, control_plane: ControlPlane, kubectl: Kubectl, tmp_path: Path
) -> None:
    """A records database and an operator that do not answer: the list still follows the cluster, and
    the other pages say what is missing and why, instead of failing."""
    nowhere = free_port()
    env = process_env(
        control_plane.kubeconfig,
        tmp_path,
        EPHEMERA_DATABASE_URL=f"postgresql+asyncpg://ephemera:x@127.0.0.1:{nowhere}/records",
        EPHEMERA_DASHBOARD_PORT=str(free_port()),
        EPHEMERA_DASHBOARD_OPERATOR_METRICS_URL=f"http://127.0.0.1:{nowhere}/metrics",
    )
    name = f"dash-norecords-{uuid.uuid4().hex[:6]}"
    proc = Process(["dashboard"], env, tmp_path / "dashboard.log", int(env["EPHEMERA_DASHBOARD_PORT"])).start()
    try:
        wait_for(lambda: http_ok(proc, "/healthz"), timeout=60, what="dashboard /healthz")
        url = f"http://127.0.0.1:{proc.port}"
        kubectl.apply(environment(name, f"octo/{name}", 41))
        wait_for(lambda: f'data-name="{name}"' in read(f"{url}/rows"), timeout=30, what=f"{name} listed")
        page = read(f"{url}/environments/{name}")
        assert "The records database is not available: " in page
        assert f"<h1>{name}</h1>" in page
        totals = read(f"{url}/totals")
        assert "The records database is not available: " in totals
        assert "the operator&#39;s metrics are not reachable" in totals
        gone = read(f"{url}/environments/dash-never-existed")
        assert "The records database is not available: " in gone  # not a 404 that it cannot know
    finally:
        proc.stop()
        kubectl.run("delete", "pe", name, "--wait=false", check=False)


def read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return str(answer.read().decode())


# The chart's Deployment: the dashboard runs with exactly the environment and identity it renders.


def test_the_chart_dashboard_runs_with_its_rendered_environment_and_read_only_identity(
    control_plane: ControlPlane, kubectl: Kubectl, postgres: Postgres, operator: Process, tmp_path: Path
) -> None:
    namespace, release = f"dash-chart-{uuid.uuid4().hex[:6]}", "dashtest"
    defaults = [d for d in yaml.safe_load_all(helm(control_plane, "template", release, str(CHART))) if d]
    assert not any("dashboard" in d["metadata"]["name"] for d in defaults), "the dashboard is off by default"
    rendered = helm(
        control_plane, "template", release, str(CHART), "--namespace", namespace, "-f", str(EVERY_OPTION),
        "--set", f"dashboard.operatorMetricsUrl=http://127.0.0.1:{operator.port}/metrics",
    )  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    objects = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    # The every-option values name the release's objects (fullnameOverride).
    full = yaml.safe_load(EVERY_OPTION.read_text())["fullnameOverride"]
    service = objects[f"Service/{full}-dashboard"]
    assert service["spec"]["type"] == "ClusterIP"  # internal only
    grants = objects[f"ClusterRole/{full}-dashboard"]["rules"]
    grants += objects[f"Role/{full}-dashboard-events"]["rules"]
    assert {verb for rule in grants for verb in rule["verbs"]} == {"get", "list", "watch"}
    # The Secret a user makes for `secrets.existingSecret` in the every-option values.
    user_secret = {"hook-secret": "x" * 32, "app-key": "", "plain-token": "", "records-url": postgres.url}
    container = rendered_containers(docs, {"my-ephemera-secrets": user_secret})["dashboard"]
    name = f"dash-chart-{uuid.uuid4().hex[:6]}"
    kubectl.apply(environment(name, f"octo/{name}", 31))
    wait_for(lambda: phase(kubectl, name) == "Ready", timeout=90, what=f"{name} Ready")

    kubectl.run("create", "namespace", namespace)
    mine = [
        d
        for d in docs
        # (not the Grafana dashboard's ConfigMap, which shares the name)
        if d["metadata"]["name"].startswith(f"{full}-dashboard")
        and d["kind"] not in ("Deployment", "Service", "ConfigMap")
    ]
    try:
        for doc in mine:
            if doc["kind"] == "ServiceAccount":
                doc["metadata"]["namespace"] = namespace
            kubectl.apply(doc)
        token = kubectl.run("-n", namespace, "create", "token", f"{full}-dashboard").stdout.strip()
        kubeconfig = tmp_path / "dashboard.kubeconfig"
        write_token_kubeconfig(kubeconfig, control_plane.server, control_plane.pki / "ca.crt", token)
        env = {**container.env, **image_env(kubeconfig), "EPHEMERA_DASHBOARD_PORT": str(free_port())}
        assert env["EPHEMERA_DASHBOARD_HOST"] == "0.0.0.0"
        assert env["EPHEMERA_DATABASE_URL"] == postgres.url
        log = tmp_path / "dashboard.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "ephemera"), *container.args], env=env, stdout=out, stderr=out
            )
        try:
            url = f"http://127.0.0.1:{env['EPHEMERA_DASHBOARD_PORT']}"
            wait_for(lambda: ok(f"{url}/healthz", proc, log), timeout=60, what="the chart's dashboard healthy")
            with urllib.request.urlopen(f"{url}/?repository=octo/{name}", timeout=30) as answer:
                assert f'data-name="{name}"' in answer.read().decode(), "the list under the dashboard's identity"
            with urllib.request.urlopen(f"{url}/environments/{name}", timeout=30) as answer:
                page = answer.read().decode()
            assert "could not be read" not in page, "the Events were refused to the dashboard's identity"
            assert "The records database is not available" not in page
            with urllib.request.urlopen(f"{url}/totals", timeout=30) as answer:
                totals = answer.read().decode()
            assert 'id="backlog">-<' not in totals, "the operator's figures were not read"
            assert "forbidden" not in log.read_text().lower(), log.read_text()
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    finally:
        for doc in reversed(mine):
            kubectl.run("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=json.dumps(doc), check=False)
        kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)
        kubectl.run("delete", "pe", name, "--wait=false", check=False)


def ok(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert proc.poll() is None, log.read_text()
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False
