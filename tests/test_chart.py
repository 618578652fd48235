"""The Helm chart and the manifests, proven on the real API server with least-privilege RBAC."""

from __future__ import annotations

import contextlib
import filecmp
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devtools.controlplane import REPO_ROOT, ControlPlane, write_token_kubeconfig
from devtools.support import Kubectl, Process, post_webhook, process_env, wait_for
from ephemera.api.naming import environment_name
from ephemera.config import Settings
from tests.conftest import WEBHOOK_SECRET, db_upgrade, http_ok, wait_policies_lifted
from tests.test_webhook import get_pe, pr_event

CHART = REPO_ROOT / "charts" / "ephemera"
RELEASE, NAMESPACE = "ephemera", "ephemera-system"
ALL_ON = [
    "--set",
    "operator.replicas=2",
    "--set",
    "webhook.ingress.enabled=true",
    "--set",
    "webhook.ingress.host=previews.example.com",
    "--set",
    "webhook.ingress.className=nginx",
    "--set",
    "webhook.ingress.tls[0].secretName=previews-tls",
    "--set",
    "webhook.ingress.tls[0].hosts[0]=previews.example.com",
    "--set",
    "webhook.podDisruptionBudget.enabled=true",
    "--set",
    "secrets.existingSecret=my-ephemera-secrets",
    "--set",
    "config.githubAppId=12345",
    "--set",
    "config.environmentUrl=https://{namespace}.previews.example.com",
    "--set",
    "config.extraEnv.EPHEMERA_STALE_THRESHOLD=900",
    "--set",
    "operator.nodeSelector.pool=system",
    "--set",
    "webhook.podAnnotations.team=platform",
    "--set",
    "imagePullSecrets[0].name=registry",
]


def helm(control_plane: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(control_plane.bin_dir / "helm"), f"--kubeconfig={control_plane.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def template(control_plane: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return helm(
        control_plane,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        "1.36.0",
        *args,
        check=check,
    )


def kinds(rendered: str) -> list[str]:
    return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in yaml.safe_load_all(rendered) if d)


def test_chart_crds_are_the_top_level_crds() -> None:
    """The chart's templates/crds.yaml renders files/crds/, which must be the top-level crds/ byte for byte."""
    top = sorted(p.name for p in (REPO_ROOT / "crds").glob("*.yaml"))
    assert top == sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    for name in top:
        assert filecmp.cmp(REPO_ROOT / "crds" / name, CHART / "files" / "crds" / name, shallow=False), name
    # Helm installs a crds/ folder once and never upgrades it: the CRDs are templates instead.
    assert not (CHART / "crds").exists()


def pinned(name: str, path: Path) -> str:
    """A version pinned in hack/tools: `NAME=value` in versions.env, or `module version` in a go.mod."""
    for line in path.read_text().splitlines():
        words = line.replace("=", " ").split()
        if len(words) >= 2 and words[0] == name:
            return words[1]
    raise AssertionError(f"{name} is not pinned in {path}")


def test_helm_is_stamped_like_a_release_build(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Built without Helm's version flags, helm assumed Kubernetes v1.20.0 and refused this chart."""
    # The chart renders without --kube-version, as a user's `helm template` would.
    result = helm(control_plane, "template", RELEASE, str(CHART), check=False)
    assert result.returncode == 0, result.stderr
    assert "Deployment" in result.stdout
    # Its default Kubernetes version is that of the client-go it is built with (v0.N -> v1.N).
    tools = REPO_ROOT / "hack" / "tools"
    minor = pinned("k8s.io/client-go", tools / "helm" / "go.mod").split(".")[1]
    probe = tmp_path / "probe"
    (probe / "templates").mkdir(parents=True)
    (probe / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (probe / "templates" / "version.yaml").write_text("# {{ .Capabilities.KubeVersion.Version }}\n")
    assert f"# v1.{minor}.0" in helm(control_plane, "template", str(probe)).stdout
    version = helm(control_plane, "version", "--template", "{{.Version}} {{.GitTreeState}}").stdout
    assert version == f"{pinned('HELM_VERSION', tools / 'versions.env')} clean"


def test_helm_lint_is_clean(control_plane: ControlPlane) -> None:
    result = helm(control_plane, "lint", str(CHART), "--strict", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout
    assert "[ERROR]" not in result.stdout


def test_renders_with_defaults_and_with_every_option(control_plane: ControlPlane) -> None:
    defaults = kinds(template(control_plane).stdout)
    assert "Deployment/ephemera-operator" in defaults
    assert "Deployment/ephemera-webhook" in defaults
    assert "PodDisruptionBudget/ephemera-webhook" in defaults
    assert "Secret/ephemera-secrets" in defaults
    assert not any(k.startswith("Ingress/") for k in defaults)
    everything = template(control_plane, *ALL_ON).stdout
    assert "Ingress/ephemera-webhook" in kinds(everything)
    assert "Secret/ephemera-secrets" not in kinds(everything)  # the existing one is used instead
    assert "my-ephemera-secrets" in everything
    docs = {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(everything) if d}
    pod = docs["Deployment/ephemera-operator"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EPHEMERA_STALE_THRESHOLD"] == "900"
    assert env["EPHEMERA_GITHUB_APP_ID"] == "12345"


def test_webhook_values_default_to_the_settings_defaults(control_plane: ControlPlane) -> None:
    """The chart passes every webhook limit explicitly, so its defaults must be the settings' own."""
    docs = {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(template(control_plane).stdout) if d}
    container = docs["Deployment/ephemera-webhook"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    fields = Settings.model_fields
    assert env["EPHEMERA_WEBHOOK_MAX_BODY_BYTES"] == str(fields["webhook_max_body_bytes"].default)
    assert env["EPHEMERA_WEBHOOK_MAX_IN_FLIGHT"] == str(fields["webhook_max_in_flight"].default)
    assert env["EPHEMERA_WEBHOOK_TOMBSTONE_RETENTION"] == str(int(fields["webhook_tombstone_retention"].default))
    assert env["EPHEMERA_WEBHOOK_NAMESPACE"] == NAMESPACE
    role = docs["Role/ephemera-webhook"]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch"]},  # webhook.mirror
    ]
    assert env["EPHEMERA_WEBHOOK_MIRROR"] == str(fields["webhook_mirror"].default).lower()


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("operator.replicas=0", "replicas"),
        ("config.namespacePrefix=Not_DNS", "namespacePrefix"),
        ("config.maxMemory=lots", "maxMemory"),
        ("webhook.service.type=Magic", "type"),
        ("config.extraEnv.PATH=/tmp", "does not match pattern '^EPHEMERA_"),
        ("secrets.webhookSecret=too-short", "webhookSecret"),
        ("webhook.maxInFlight=0", "maxInFlight"),
        ("unknownKey=1", "unknownKey"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(control_plane: ControlPlane, value: str, complaint: str) -> None:
    result = template(control_plane, "--set", value, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr


def test_plain_manifests_are_rendered_from_the_chart(tmp_path: Path) -> None:
    fresh = tmp_path / "ephemera.yaml"
    subprocess.run(["bash", str(REPO_ROOT / "hack" / "render-manifests.sh"), str(fresh)], check=True, timeout=120)
    committed = REPO_ROOT / "deploy" / "manifests" / "ephemera.yaml"
    assert fresh.read_text() == committed.read_text(), "run `make manifests` and commit the result"


def test_the_kustomization_keeps_the_events_role_in_default(kubectl: Kubectl) -> None:
    """`kubectl apply -k deploy/` puts the release in `ephemera`; Events of cluster-scoped objects live in `default`."""
    built = kubectl.run("kustomize", str(REPO_ROOT / "deploy")).stdout
    where = {f"{d['kind']}/{d['metadata']['name']}": d["metadata"].get("namespace") for d in yaml.safe_load_all(built)}
    assert where["Role/ephemera-operator-events"] == "default"
    assert where["RoleBinding/ephemera-operator-events"] == "default"
    assert where["Deployment/ephemera-operator"] == "ephemera"
    assert where["ServiceAccount/ephemera-operator"] == "ephemera"


@pytest.fixture(scope="module")
def installed(control_plane: ControlPlane, kubectl: Kubectl, crd: Path) -> Iterator[str]:
    """The chart, installed into the local control plane (after a server-side dry run of the kustomization)."""
    kubectl.run("apply", "-f", str(REPO_ROOT / "crds"))
    # A server-side dry run cannot create the namespace its objects go to: that one is made for real.
    kubectl.run("apply", "-f", str(REPO_ROOT / "deploy" / "namespace.yaml"))
    dry = kubectl.run("apply", "--dry-run=server", "-k", str(REPO_ROOT / "deploy"), check=False)
    assert dry.returncode == 0, dry.stderr
    # The session's CRDs were applied by kubectl, not by a release: this one leaves them be
    # (tests/test_chart_crds.py installs and upgrades CRDs with a release).
    result = helm(
        control_plane,
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--set",
        "crds.install=false",
        "--set",
        f"secrets.webhookSecret={WEBHOOK_SECRET}",
        "--set",
        "secrets.databaseUrl=sqlite+aiosqlite:///x.db",
    )
    assert "STATUS: deployed" in result.stdout
    assert "Point your GitHub App's webhook at the release" in result.stdout
    yield NAMESPACE
    helm(control_plane, "uninstall", RELEASE, "--namespace", NAMESPACE, check=False)
    wait_policies_lifted(kubectl)


def test_install_creates_every_object(installed: str, kubectl: Kubectl) -> None:
    for kind, name in (
        ("deployment", "ephemera-operator"),
        ("deployment", "ephemera-webhook"),
        ("service", "ephemera-webhook"),
        ("poddisruptionbudget", "ephemera-webhook"),
        ("serviceaccount", "ephemera-operator"),
        ("serviceaccount", "ephemera-webhook"),
        ("secret", "ephemera-secrets"),
    ):
        assert kubectl.run("-n", installed, "get", kind, name, check=False).returncode == 0, (kind, name)
    assert kubectl.run("get", "clusterkopfpeering", "ephemera", check=False).returncode == 0


def test_the_metrics_services_reach_the_processes_pods(installed: str, kubectl: Kubectl) -> None:
    """Each metrics Service selects its process's pods (kwok runs them) on the port /metrics is served on."""
    for component, port in (("operator", 8081), ("webhook", 8080)):

        def endpoints(component: str = component) -> list[tuple[int, int]]:
            slices = kubectl.json(
                "-n",
                installed,
                "get",
                "endpointslices",
                "-l",
                f"kubernetes.io/service-name=ephemera-{component}-metrics",
            )["items"]
            return [
                (p["port"], len([e for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready")]))
                for s in slices
                for p in s.get("ports") or []
                if p.get("name") == "metrics"
            ]

        found = wait_for(
            lambda: [e for e in endpoints() if e[1] > 0], timeout=90, what=f"{component} metrics endpoints"
        )
        assert {p for p, _ in found} == {port}


def token_kubeconfig(kubectl: Kubectl, control_plane: ControlPlane, account: str, path: Path) -> Path:
    token = kubectl.run("-n", NAMESPACE, "create", "token", account, "--duration=1h").stdout.strip()
    write_token_kubeconfig(path, control_plane.server, control_plane.pki / "ca.crt", token)
    return path


@contextlib.contextmanager
def paused(operator: Process) -> Iterator[None]:
    operator.stop()
    try:
        yield
    finally:
        operator.start()
        wait_for(lambda: http_ok(operator, "/healthz"), timeout=60, what="operator /healthz")


def test_processes_run_a_full_lifecycle_under_the_charts_identities(
    installed: str, kubectl: Kubectl, control_plane: ControlPlane, operator: Process, tmp_path: Path
) -> None:
    op_config = token_kubeconfig(kubectl, control_plane, "ephemera-operator", tmp_path / "operator.kubeconfig")
    wh_config = token_kubeconfig(kubectl, control_plane, "ephemera-webhook", tmp_path / "webhook.kubeconfig")
    # The release's namespace, as the chart's Deployment sets it: the operator's ConfigMaps (the backstop's,
    # the job requests') are there, where its Roles are.
    op_env = process_env(op_config, tmp_path, EPHEMERA_PEERING="ephemera", EPHEMERA_WEBHOOK_NAMESPACE=NAMESPACE)
    db_upgrade(op_env)
    wh_env = process_env(
        wh_config, tmp_path, EPHEMERA_WEBHOOK_SECRET=WEBHOOK_SECRET, EPHEMERA_WEBHOOK_NAMESPACE=NAMESPACE
    )
    with paused(operator):
        op = Process(["operator"], op_env, tmp_path / "operator.log", int(op_env["EPHEMERA_OPERATOR_PORT"])).start()
        wh = Process(["webhook"], wh_env, tmp_path / "webhook.log", int(wh_env["EPHEMERA_WEBHOOK_PORT"])).start()
        try:
            wait_for(lambda: http_ok(op, "/healthz") and http_ok(wh, "/readyz"), timeout=60, what="both up")
            repo, number = f"octo/rbac-{uuid.uuid4().hex[:4]}", 7
            name = environment_name(repo, number)
            opened = pr_event("opened", repo=repo, number=number, sha="e" * 40, updated_at="2026-01-01T00:00:00Z")
            assert post_webhook(wh.port, "pull_request", opened, secret=WEBHOOK_SECRET).body["result"] == "created"
            wait_for(
                lambda: ((get_pe(kubectl, name) or {}).get("status") or {}).get("phase") == "Ready",
                timeout=60,
                what="Ready under the operator's ServiceAccount",
            )
            namespace = get_pe(kubectl, name)["status"]["namespace"]  # type: ignore[index]
            closed = pr_event("closed", repo=repo, number=number, sha="e" * 40, updated_at="2026-01-01T00:01:00Z")
            assert post_webhook(wh.port, "pull_request", closed, secret=WEBHOOK_SECRET).body["result"] == "deleted"
            wait_for(lambda: get_pe(kubectl, name) is None, timeout=90, what="teardown under the chart's RBAC")
            assert kubectl.run("get", "namespace", namespace, check=False).returncode != 0
            assert "not live" not in wh.log()  # its mirrors listed and watched under the chart's Role
            assert "forbidden" not in op.log().lower()
            assert "forbidden" not in wh.log().lower()
        finally:
            op.stop()
            wh.stop()


def test_identities_are_refused_outside_their_grants(
    installed: str, kubectl: Kubectl, control_plane: ControlPlane, tmp_path: Path
) -> None:
    webhook = Kubectl(kubectl.binary, token_kubeconfig(kubectl, control_plane, "ephemera-webhook", tmp_path / "w"))
    operator = Kubectl(kubectl.binary, token_kubeconfig(kubectl, control_plane, "ephemera-operator", tmp_path / "o"))
    denied = webhook.run("create", "namespace", f"not-allowed-{uuid.uuid4().hex[:4]}", check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr
    # get, create, patch, delete, list (installation events mark every environment of an
    # installation or repository) and watch (webhook.mirror); no update.
    assert webhook.run("get", "pe", check=False).returncode == 0
    assert webhook.run("auth", "can-i", "watch", "previewenvironments.ephemera.dev").stdout.strip() == "yes"
    for verb in ("update", "deletecollection"):
        answer = webhook.run("auth", "can-i", verb, "previewenvironments.ephemera.dev", check=False).stdout.strip()
        assert answer == "no", verb
    for args in (("-n", "kube-system", "get", "secrets"), ("-n", "default", "get", "secret", "anything")):
        denied = operator.run(*args, check=False)
        assert denied.returncode != 0
        assert "forbidden" in denied.stderr
    assert operator.run("auth", "can-i", "create", "namespaces").stdout.strip() == "yes"
    # The webhook keeps its closed-PR ConfigMaps in the release's namespace (and mirrors them), and may
    # touch no others.
    for verb in ("get", "create", "update", "list", "watch"):
        assert webhook.run("auth", "can-i", verb, "configmaps", "-n", NAMESPACE).stdout.strip() == "yes"
    for verb, namespace in (("delete", NAMESPACE), ("list", "default"), ("create", "default"), ("get", "kube-system")):
        answer = webhook.run("auth", "can-i", verb, "configmaps", "-n", namespace, check=False).stdout.strip()
        assert answer == "no", (verb, namespace)
    assert webhook.run("auth", "can-i", "get", "secrets", "-n", NAMESPACE, check=False).stdout.strip() == "no"
    assert operator.run("auth", "can-i", "delete", "nodes", check=False).stdout.strip() == "no"
