"""A `helm install` works: each process starts and becomes healthy with exactly the environment that
its rendered Deployment gives it.

Pods cannot run here (no nodes), so this is the proof. The chart is rendered with the README's
install values and with every option (tests/chart/every-option.yaml); the rendered ServiceAccounts,
RBAC, admission policies and peering object are applied to the local API server; then the init
container's `ephemera db upgrade`, `ephemera operator` and `ephemera webhook` run as subprocesses
whose environment is the container's `env`/`envFrom`, with secretKeyRef/configMapKeyRef values
taken from the rendered Secret (or, with `secrets.existingSecret`, the Secret a user would create).
Two things are added, because a pod gets them from the cluster and the image: EPHEMERA_KUBECONFIG
(a token of the rendered ServiceAccount, standing in for in-cluster config) and the image's PATH.
The rendered ports are used as they are unless already taken on this machine; then the test moves
that process to a free port by rewriting its EPHEMERA_*_PORT (noted at the top of its log). One
value differs from the install: `config.githubApiUrl` points at the local GitHub server.
Once both are healthy, a signed `opened` event must become a Ready environment reported on GitHub,
and `closed` must tear it down, all under the rendered RBAC and admission policies.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.controlplane import REPO_ROOT, ControlPlane, free_port, write_token_kubeconfig
from devtools.fakegithub import FakeGitHub, Server
from devtools.postgres import Postgres
from devtools.support import Kubectl, post_webhook, stop_process, wait_for
from ephemera.api.naming import environment_name
from tests.test_github import INSTALLATION
from tests.test_webhook import get_pe, pr_event

CHART = REPO_ROOT / "charts" / "ephemera"
EVERY_OPTION = REPO_ROOT / "tests" / "chart" / "every-option.yaml"
# Applied to the API server: what the processes need from the cluster. Workloads are not (no nodes).
CLUSTER_KINDS = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ClusterKopfPeering",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
WEBHOOK_SECRET = "a-webhook-secret-of-32-characters"


def helm(control_plane: ControlPlane, *args: str) -> str:
    result = subprocess.run(
        [str(control_plane.bin_dir / "helm"), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Every option the schema names, as dotted paths (objects with named properties are descended)."""
    paths: set[str] = set()
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{name}"
        paths.add(path)
        paths |= schema_paths(sub, f"{path}.")
    return paths


def value_paths(values: Any, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    if isinstance(values, dict):
        for name, sub in values.items():
            path = f"{prefix}{name}"
            paths.add(path)
            paths |= value_paths(sub, f"{path}.")
    return paths


def test_the_every_option_file_sets_every_option_of_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load(EVERY_OPTION.read_text())
    missing = schema_paths(schema) - value_paths(values)
    assert not missing, f"tests/chart/every-option.yaml does not set {sorted(missing)}"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass
class Container:
    """A rendered container, ready to run as a process."""

    name: str
    args: list[str]
    env: dict[str, str]
    probes: list[tuple[str, int]]  # (path, port) of its liveness and readiness probes


def resolve_env(
    container: dict[str, Any], secrets: dict[str, dict[str, str]], config_maps: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The environment Kubernetes would give the container: env and envFrom, references resolved."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            env.update({prefix + k: v for k, v in secrets[source["secretRef"]["name"]].items()})
        if "configMapRef" in source:
            env.update({prefix + k: v for k, v in config_maps[source["configMapRef"]["name"]].items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        kind, store = ("secretKeyRef", secrets) if "secretKeyRef" in ref else ("configMapKeyRef", config_maps)
        key_ref = ref[kind]
        data = store.get(key_ref["name"])
        if data is None or key_ref["key"] not in data:
            # A missing required key keeps the pod from starting (CreateContainerConfigError).
            assert key_ref.get("optional"), f"{container['name']}: {item['name']} needs {key_ref} which is missing"
            continue
        env[item["name"]] = data[key_ref["key"]]
    return env


def rendered_containers(docs: list[dict[str, Any]], extra_secrets: dict[str, dict[str, str]]) -> dict[str, Container]:
    """The db-upgrade init container, the operator and the webhook, with their environments."""
    by_deployment = deployment_containers(docs, extra_secrets).values()
    return {name: container for containers in by_deployment for name, container in containers.items()}


def deployment_containers(
    docs: list[dict[str, Any]], extra_secrets: dict[str, dict[str, str]]
) -> dict[str, dict[str, Container]]:
    """Each Deployment's containers (init containers first) by name, with their environments: by
    Deployment, for a chart that renders several of one component (the operator's shards)."""
    secrets = dict(extra_secrets)
    config_maps: dict[str, dict[str, str]] = {}
    for doc in docs:
        if doc["kind"] == "Secret":
            secrets[doc["metadata"]["name"]] = dict(doc.get("stringData") or {})
        if doc["kind"] == "ConfigMap":
            config_maps[doc["metadata"]["name"]] = dict(doc.get("data") or {})
    found: dict[str, dict[str, Container]] = {}
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        containers = found[doc["metadata"]["name"]] = {}
        pod = doc["spec"]["template"]["spec"]
        mounted = [v for v in pod.get("volumes") or [] if "secret" in v or "projected" in v]
        assert not mounted, "the chart now mounts secret files: write them out here at their mount paths"
        for container in pod.get("initContainers", []) + pod["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports") or []}
            probes = [
                (probe["httpGet"]["path"], ports.get(probe["httpGet"]["port"], probe["httpGet"]["port"]))
                for probe in (container.get("livenessProbe"), container.get("readinessProbe"))
                if probe
            ]
            containers[container["name"]] = Container(
                container["name"],
                list(container.get("args") or []),
                resolve_env(container, secrets, config_maps),
                probes,
            )
    return found


@dataclass
class Running:
    container: Container
    proc: subprocess.Popen[bytes]
    log: Path
    remapped: dict[int, int]

    def output(self) -> str:
        """The log's tail, for a message about a process that exited."""
        return self.text()[-4000:]

    def text(self) -> str:
        """The whole log, for what a test asserts about it."""
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)

    def ports(self) -> list[int]:
        """The ports it listens on (as rendered, or where they were moved)."""
        return [self.remapped.get(port, port) for _, port in self.container.probes]

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"{self.container.name} exited:\n{self.output()}"
        for path, port in self.container.probes:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.remapped.get(port, port)}{path}", timeout=2) as r:
                    if r.status != 200:
                        return False
            except OSError:
                return False
        return True


def ephemera(container: Container, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "ephemera"), *container.args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
        )


def image_env(kubeconfig: Path | None) -> dict[str, str]:
    """What the image and the cluster give a pod besides the Deployment's env (see the module docstring)."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    if kubeconfig is not None:
        env["EPHEMERA_KUBECONFIG"] = str(kubeconfig)
    return env


def start(container: Container, kubeconfig: Path, tmp: Path, *, log: str = "", taken: Iterable[int] = ()) -> Running:
    """The container as a process, its log `tmp/<log or the container's name>.log`. A rendered port that
    is `taken` (by another process of the same release) or busy on this machine is moved."""
    env = {**container.env, **image_env(kubeconfig)}
    remapped: dict[int, int] = {}
    for name in ("EPHEMERA_OPERATOR_PORT", "EPHEMERA_WEBHOOK_PORT"):
        if name in env and (int(env[name]) in taken or not port_free(int(env[name]))):
            remapped[int(env[name])] = free_port()
            env[name] = str(remapped[int(env[name])])
    path = tmp / f"{log or container.name}.log"
    if remapped:
        path.write_text(f"# rendered ports taken on this machine, moved: {remapped}\n")
    return Running(container, ephemera(container, env, path), path, remapped)


def apply_release(kubectl: Kubectl, docs: list[dict[str, Any]], namespace: str, applied: list[dict[str, Any]]) -> None:
    """What the processes need from the cluster, as `helm install` would make it: the CRDs (the peering
    one too), the release's namespace and its rendered CLUSTER_KINDS, each added to `applied` (the
    fixture deletes them after the test)."""
    kubectl.run("apply", "-f", str(REPO_ROOT / "crds"))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/clusterkopfpeerings.kopf.dev")
    kubectl.run("create", "namespace", namespace)
    applied.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    for doc in docs:
        if doc["kind"] in CLUSTER_KINDS:
            if doc["kind"] == "ServiceAccount":  # helm template leaves the release namespace out
                doc["metadata"]["namespace"] = namespace
            kubectl.apply(doc)
            applied.append(doc)


def token_kubeconfig(control_plane: ControlPlane, kubectl: Kubectl, namespace: str, account: str, tmp: Path) -> Path:
    """A kubeconfig with a token of the release's ServiceAccount `account`: in-cluster config's stand-in."""
    value = kubectl.run("-n", namespace, "create", "token", account, "--duration=1h").stdout.strip()
    path = tmp / f"{account}.kubeconfig"
    write_token_kubeconfig(path, control_plane.server, control_plane.pki / "ca.crt", value)
    return path


def run_init(init: Container, tmp: Path) -> None:
    """An init container (`ephemera db upgrade`) run to its end, as before the pod's other containers."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ephemera"), *init.args],
        env={**init.env, **image_env(None)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@contextlib.contextmanager
def running(pods: list[tuple[str, Container, Path]], tmp: Path) -> Iterator[list[Running]]:
    """Each (log name, container, kubeconfig) started as a process, waited for until its probes answer,
    and stopped after as the kubelet stops a pod (SIGTERM, then SIGKILL)."""
    started: list[Running] = []
    try:
        for log, container, kubeconfig in pods:
            ports = [port for proc in started for port in proc.ports()]
            started.append(start(container, kubeconfig, tmp, log=log, taken=ports))
        for proc in started:
            wait_for(proc.healthy, timeout=90, what=f"{proc.log.stem} healthy ({proc.container.probes})")
        yield started
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="module")
def app() -> Iterator[FakeGitHub]:
    """The local GitHub API server, for an App whose id has 7 digits (a float in the values otherwise)."""
    server = Server(FakeGitHub(app_id=1234567))
    fake = server.start()
    yield fake
    server.stop()


def render_cases(postgres: Postgres, app: FakeGitHub, tmp: Path) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """Each case: helm arguments, and the Secrets a user creates beforehand (for existingSecret).

    Both point the operator at the local GitHub server instead of GitHub (the one value changed
    from the README's install and from the every-option file): tests never call the real GitHub."""
    key_file = tmp / "app.private-key.pem"
    key_file.write_text(app.private_key_pem)
    github = ["--set", f"config.githubApiUrl={app.url('')}"]
    readme_install = [
        "--set", "image.repository=registry.example.com/ephemera",
        "--set", "config.githubAppId=1234567",
        "--set-file", f"secrets.githubPrivateKey={key_file}",
        "--set", f"secrets.webhookSecret={WEBHOOK_SECRET}",
        "--set", f"secrets.databaseUrl={postgres.url}",
        "--set", "webhook.ingress.enabled=true",
        "--set", "webhook.ingress.host=previews.example.com",
    ]  # fmt: skip
    existing = {
        "my-ephemera-secrets": {
            "hook-secret": WEBHOOK_SECRET,
            "app-key": app.private_key_pem,
            "plain-token": "ghp_" + "x" * 36,
            "records-url": postgres.url,
            "hooks-key": "a-hook-signing-secret-of-32-chars",
        }
    }
    return {
        "defaults": (readme_install + github, {}),
        "every-option": (["-f", str(EVERY_OPTION), *github], existing),
    }


@pytest.mark.parametrize("case", ["defaults", "every-option"])
def test_each_process_is_healthy_with_the_environment_its_deployment_gives_it(
    case: str,
    operator_paused: None,
    control_plane: ControlPlane,
    kubectl: Kubectl,
    postgres: Postgres,
    app: FakeGitHub,
    applied: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    args, user_secrets = render_cases(postgres, app, tmp_path)[case]
    namespace, release = f"chart-env-{uuid.uuid4().hex[:6]}", "envtest"
    rendered = helm(control_plane, "template", release, str(CHART), "--namespace", namespace, *args)
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    containers = rendered_containers(docs, user_secrets)
    # The dashboard (on in the every-option case) is run under its rendered env by tests/test_dashboard.py.
    assert set(containers) - {"dashboard"} == {"db-upgrade", "operator", "webhook"}

    apply_release(kubectl, docs, namespace, applied)
    # The init container: `ephemera db upgrade` must finish before the operator starts.
    run_init(containers["db-upgrade"], tmp_path)

    # Each Deployment's own ServiceAccount (fullnameOverride changes their names).
    accounts = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["spec"]["serviceAccountName"]
        for d in docs
        if d["kind"] == "Deployment"
    }
    pods = [
        (name, containers[name], token_kubeconfig(control_plane, kubectl, namespace, accounts[name], tmp_path))
        for name in ("operator", "webhook")
    ]
    with running(pods, tmp_path) as (operator, webhook):
        # The operator's /healthz answers before kopf has connected: its entry in the peering object
        # proves that kopf, too, reached the API server as the chart's ServiceAccount.
        peering = containers["operator"].env["EPHEMERA_PEERING"]
        wait_for(
            lambda: kubectl.json("get", "clusterkopfpeering", peering).get("status"),
            timeout=60,
            what="the operator in its peering object",
        )
        # And they work together: a signed PR event becomes a Ready environment, reported on GitHub,
        # and its close tears it down (under the chart's RBAC and admission policies).
        port = int(webhook.container.env["EPHEMERA_WEBHOOK_PORT"])
        port = webhook.remapped.get(port, port)
        repo, number, sha = f"octo-org/chart-{case}", 4242, uuid.uuid4().hex + "0" * 8
        opened = pr_event("opened", repo=repo, number=number, sha=sha, updated_at="2026-01-01T00:00:00Z")
        opened["installation"]["id"] = INSTALLATION  # the local GitHub's installation on that account
        answer = post_webhook(port, "pull_request", opened, secret=WEBHOOK_SECRET)
        assert (answer.status, answer.body.get("result")) == (202, "created"), answer
        prefix = operator.container.env["EPHEMERA_NAMESPACE_PREFIX"]
        name = environment_name(repo, number, prefix)
        ready = wait_for(
            lambda: (s := (get_pe(kubectl, name) or {}).get("status") or {}).get("phase") == "Ready" and s,
            timeout=90,
            what=f"{name} Ready",
        )
        assert ready["namespace"].startswith(f"{prefix}-")
        wait_for(lambda: app.calls_to("POST", rf"/repos/{repo}/statuses/{sha}"), timeout=60, what="a commit status")
        closed = pr_event("closed", repo=repo, number=number, sha=sha, updated_at="2026-01-01T00:01:00Z")
        assert post_webhook(port, "pull_request", closed, secret=WEBHOOK_SECRET).body.get("result") == "deleted"
        wait_for(lambda: get_pe(kubectl, name) is None, timeout=90, what=f"{name} torn down")
        for proc in (operator, webhook):
            assert proc.healthy()
            assert "forbidden" not in proc.text().lower(), proc.output()


def test_numbers_render_as_integers_that_the_settings_accept(control_plane: ControlPlane) -> None:
    """YAML numbers reach templates as floats: from 7 digits on they printed as 1.048576e+07."""
    docs = yaml.safe_load_all(helm(control_plane, "template", "x", str(CHART), "-f", str(EVERY_OPTION)))
    env: dict[str, str] = {}
    for doc in docs:
        if doc and doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    assert env["EPHEMERA_GITHUB_APP_ID"] == "1234567"
    assert env["EPHEMERA_WEBHOOK_MAX_BODY_BYTES"] == "5242880"
    assert env["EPHEMERA_PURGE_BATCH"] == "1000000"
    assert env["EPHEMERA_STALE_THRESHOLD"] == "900"
    defaults = yaml.safe_load_all(helm(control_plane, "template", "x", str(CHART)))
    webhook = next(d for d in defaults if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith("webhook"))
    values = {e["name"]: e.get("value") for e in webhook["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert values["EPHEMERA_WEBHOOK_MAX_BODY_BYTES"].isdigit(), values["EPHEMERA_WEBHOOK_MAX_BODY_BYTES"]
