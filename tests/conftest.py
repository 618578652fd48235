"""Session fixtures: one real control plane (etcd, kube-apiserver, kube-controller-manager) per run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest

from devtools.controlplane import REPO_ROOT, ControlPlane, running
from devtools.fakegithub import FakeGitHub, Server
from devtools.postgres import Postgres
from devtools.support import SOAK, Kubectl, Process, process_env, wait_for
from ephemera.kube import Kube, load_api_client

# No example is judged by its time (speed is measured by bench/, never asserted): hypothesis's default
# 200 ms deadline fails a microsecond example that a loaded machine happens to pause.
hypothesis.settings.register_profile("ephemera", deadline=None)
hypothesis.settings.load_profile("ephemera")

CRD = REPO_ROOT / "crds" / "previewenvironments.yaml"
TEMPLATE_CRD = REPO_ROOT / "crds" / "previewtemplates.yaml"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with running(tmp_path_factory.mktemp("control-plane")) as plane:
        os.environ["KUBECONFIG"] = str(plane.kubeconfig)
        yield plane


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    return Kubectl(control_plane.bin_dir / "kubectl", control_plane.kubeconfig)


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Iterator[Kube]:
    """Ephemera's own Kubernetes adapter, in this process, on the test control plane."""
    client = Kube(load_api_client(control_plane.kubeconfig))
    yield client
    client.close()


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A plain namespace of the test's own, deleted (without waiting) after it."""
    name = f"scratch-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def crd(kubectl: Kubectl) -> Path:
    """The PreviewEnvironment CRD, installed and Established."""
    kubectl.run("apply", "-f", str(CRD), "-f", str(TEMPLATE_CRD))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/previewenvironments.ephemera.dev")
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/previewtemplates.ephemera.dev")
    # Discovery can lag the Established condition by a moment; kubectl needs it to map `pe`.
    wait_for(lambda: kubectl.run("get", "pe", check=False).returncode == 0, timeout=30, what="pe discovery")
    return CRD


@pytest.fixture(scope="session")
def github() -> Iterator[FakeGitHub]:
    """The local GitHub API server, in this process (tests read what it received)."""
    server = Server(FakeGitHub())
    fake = server.start()
    yield fake
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server, started for the run and stopped after it."""
    # Not under pytest's tmp dir: that is private to root, and the server runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="ephemera-pg-"))
    server = Postgres(base).init()
    server.start()
    yield server
    if server.running():
        server.stop()
    shutil.rmtree(base, ignore_errors=True)


def db_upgrade(env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "ephemera.cli", "db", "upgrade"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="session")
def operator(
    crd: Path,
    control_plane: ControlPlane,
    github: FakeGitHub,
    postgres: Postgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Process]:
    """`ephemera operator` as in production: a subprocess against the real API server, reporting to
    GitHub and recording to PostgreSQL."""
    tmp = tmp_path_factory.mktemp("operator")
    env = process_env(
        control_plane.kubeconfig,
        tmp,
        EPHEMERA_DATABASE_URL=postgres.url,
        EPHEMERA_MAX_CPU="8",
        EPHEMERA_WORKERS="50",
        EPHEMERA_GITHUB_API_URL=github.url(""),
        EPHEMERA_GITHUB_APP_ID=str(github.app_id),
        EPHEMERA_GITHUB_PRIVATE_KEY=github.private_key_pem,
        EPHEMERA_GITHUB_RETRY_MAX_DELAY="5",
        # 60 s by default (GitHub's minimum); tests/test_github.py checks the default path in-process.
        EPHEMERA_GITHUB_SECONDARY_RATE_LIMIT_DELAY="1",
        EPHEMERA_HELM_BINARY=str(control_plane.bin_dir / "helm"),
        # One environment a second: tests/test_apps.py checks the spacing of a template's rollout.
        EPHEMERA_TEMPLATE_ROLLOUT_RATE="1",
    )
    db_upgrade(env)
    proc = Process(["operator"], env, tmp / "operator.log", int(env["EPHEMERA_OPERATOR_PORT"])).start()
    wait_for(lambda: http_ok(proc, "/healthz"), timeout=60, what="operator /healthz")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def operator_paused(operator: Process) -> Iterator[None]:
    """The session's operator stopped for a module whose objects no operator must touch (or only its
    own, with other settings), started again after it."""
    operator.stop()
    yield
    operator.start()
    wait_for(lambda: http_ok(operator, "/healthz"), timeout=60, what="the session operator back")


def operator_with(operator: Process, settings: dict[str, str]) -> Iterator[Process]:
    """The body of a fixture (`yield from`): the session's operator restarted with `settings` over its
    own while the fixture lasts, then started again as it was."""
    operator.stop()
    proc = Process(operator.args, {**operator.env, **settings}, operator.log_path, operator.port).start()
    wait_for(lambda: http_ok(proc, "/healthz"), timeout=60, what="operator /healthz")
    yield proc
    proc.stop()
    operator.start()
    wait_for(lambda: http_ok(operator, "/healthz"), timeout=60, what="operator /healthz")


def start_webhook(control_plane: ControlPlane, tmp: Path, log: str = "webhook", **settings: str) -> Process:
    """`ephemera webhook` with `settings` against the real API server, its log in `tmp`, once ready."""
    env = process_env(control_plane.kubeconfig, tmp, **settings)
    proc = Process(["webhook"], env, tmp / f"{log}.log", int(env["EPHEMERA_WEBHOOK_PORT"])).start()
    wait_for(lambda: http_ok(proc, "/readyz"), timeout=60, what=f"{log} /readyz")
    return proc


def app_settings(github: FakeGitHub) -> dict[str, str]:
    """The settings of a GitHub App on the local GitHub server."""
    return {
        "EPHEMERA_GITHUB_API_URL": github.url(""),
        "EPHEMERA_GITHUB_APP_ID": str(github.app_id),
        "EPHEMERA_GITHUB_PRIVATE_KEY": github.private_key_pem,
    }


WEBHOOK_SECRET = "test-webhook-secret"


@pytest.fixture(scope="session")
def webhook(crd: Path, control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """`ephemera webhook` as in production, with a secret, against the real API server."""
    tmp = tmp_path_factory.mktemp("webhook")
    proc = start_webhook(control_plane, tmp, EPHEMERA_WEBHOOK_SECRET=WEBHOOK_SECRET, EPHEMERA_WEBHOOK_BODY_TIMEOUT="2")
    yield proc
    proc.stop()


def wait_policies_lifted(kubectl: Kubectl) -> None:
    """Wait until the chart's admission policies, just deleted, no longer refuse this test's user a
    PreviewEnvironment with spec.installationId. The API server applies a deleted policy a while
    longer (from its cache: 20 refusals in 0.7 s were measured after `helm uninstall` returned), and
    the next module's environments that name an installation, the webhook's among them, would be
    refused meanwhile (422 from the webhook)."""

    def allowed() -> bool:
        body = {
            "apiVersion": "ephemera.dev/v1alpha1",
            "kind": "PreviewEnvironment",
            "metadata": {"name": f"policy-probe-{uuid.uuid4().hex[:8]}"},
            "spec": {
                "repository": "octo/probe",
                "pullRequest": 1,
                "commitSha": "a" * 40,
                "branch": "probe",
                "installationId": 1,
            },
        }
        answer = kubectl.run("create", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)
        # Anything but the policy's refusal is a test defect, not a wait.
        assert answer.returncode == 0 or "ValidatingAdmissionPolicy" in answer.stderr, answer.stderr
        return answer.returncode == 0

    wait_for(allowed, timeout=30, what="the chart's admission policies lifted")


@pytest.fixture
def applied(kubectl: Kubectl, crd: Path) -> Iterator[list[dict[str, Any]]]:
    """Objects applied by a test, deleted after it (cluster-wide policies must not outlive it)."""
    objects: list[dict[str, Any]] = []
    yield objects
    for doc in reversed(objects):
        kubectl.run("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=json.dumps(doc), check=False)
    wait_policies_lifted(kubectl)


def http_ok(proc: Process, path: str) -> bool:
    assert proc.proc is not None
    assert proc.proc.poll() is None, f"process exited:\n{proc.log()[-3000:]}"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}{path}", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The soak summary: what the reliability scenarios did, and what was lost or leaked."""
    if not SOAK:
        return
    keys = ["runs", "kills", "events sent", "faults injected", "bad inputs tried", "records lost", "namespaces leaked"]
    terminalreporter.section("reliability summary")
    for key in keys:
        terminalreporter.write_line(f"{key:>18}: {SOAK[key]}")
