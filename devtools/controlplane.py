"""A real local Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, and kwok playing the kubelet of a few fake nodes, so that workloads really roll out.

Used by `make cluster`, `make run` and the test suite. The binaries come from `hack/build-tools.sh`
(built once per version into a cache outside the checkout); certificates are generated here; ports
are chosen free at start, so that several control planes can run side by side.

No container runs: kwok marks the pods that the scheduler bound to its nodes Running and Ready, and
Jobs' pods Succeeded. A pod labelled `ephemera.dev/simulate` = `crash-loop`, `image-pull` or `fail`
gets that failure instead (the Stages in hack/kwok/simulate.yaml).

    python -m devtools.controlplane up STATE_DIR     start, write STATE_DIR/kubeconfig
    python -m devtools.controlplane down STATE_DIR   stop what `up` started
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"
NODES = 2  # fake nodes kwok plays the kubelet of
KWOK_STAGES = REPO_ROOT / "hack" / "kwok" / "simulate.yaml"
# Stops in this order: the clients of the API server first, etcd last.
PROCESSES = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
CONTROLLERS = ",".join(
    [
        "namespace-controller",
        "garbage-collector-controller",
        "resourcequota-controller",
        "serviceaccount-controller",
        "serviceaccount-token-controller",
        "clusterrole-aggregation-controller",
        "root-ca-certificate-publisher-controller",
        # Workloads: Deployments roll out through ReplicaSets, Jobs run, Services get endpoints, and
        # the node-lifecycle controller lifts the not-ready taint from new nodes.
        "deployment-controller",
        "replicaset-controller",
        "statefulset-controller",
        "daemonset-controller",
        "job-controller",
        "endpointslice-controller",
        "node-lifecycle-controller",
        "pod-garbage-collector-controller",
    ]
)


def tools_dir(build: bool = True) -> Path:
    """Return the directory of the built binaries, building them first when `build` is set."""
    script = REPO_ROOT / "hack" / "build-tools.sh"
    args = ["bash", str(script)] if build else ["bash", str(script), "--print"]
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def shell_exports(kubeconfig: Path, bin_dir: Path) -> list[str]:
    """The lines that point a shell at the local cluster: KUBECONFIG, and a PATH on which the built
    kubectl and helm (and the virtualenv's `ephemera`, `kubectl-ephemera`) come before any other
    (Debian's /usr/bin/kubectl, say, which is too old for this API server)."""
    venv_bin = Path(sys.executable).parent
    return [
        f"export KUBECONFIG={shlex.quote(str(kubeconfig))}",
        f'export PATH={shlex.quote(f"{bin_dir}{os.pathsep}{venv_bin}")}{os.pathsep}"$PATH"',
    ]


# Every port free_port() has handed out in this process: each is bound later, by another process, and
# meanwhile, or while that process is stopped (the tests pause the session's operator and start it
# again on its port), it is free, so the kernel hands it out again (bind to port 0 repeated one within
# 94 picks here; a session picks more than that).
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A loopback port nothing is bound to now, and never handed out before by this process."""
    with _HANDED_OUT_LOCK:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port: int = sock.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def generate_pki(pki: Path) -> None:
    """Write a CA, the API server's serving certificate, a service-account key pair and client certs."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("ephemera-local-ca")
    ca = _cert(ca_name, ca_key, None, ca=True)
    _write_key(pki / "ca.key", ca_key)
    (pki / "ca.crt").write_bytes(_pem(ca))

    server_key = _key()
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    ]
    server = _cert(_name("kube-apiserver"), server_key, (ca_name, ca_key), sans=sans, server=True)
    _write_key(pki / "apiserver.key", server_key)
    (pki / "apiserver.crt").write_bytes(_pem(server))

    sa_key = _key()
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    clients = {
        "admin": _name("ephemera-admin", "system:masters"),
        "controller-manager": _name("system:kube-controller-manager"),
        "scheduler": _name("system:kube-scheduler"),
    }
    for name, subject in clients.items():
        key = _key()
        _write_key(pki / f"{name}.key", key)
        (pki / f"{name}.crt").write_bytes(_pem(_cert(subject, key, (ca_name, ca_key))))


def write_kubeconfig(path: Path, server: str, pki: Path, client: str) -> None:
    """Write a kubeconfig (JSON is valid YAML) with absolute paths to the certificates."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "ephemera-local",
                "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": client,
                "user": {
                    "client-certificate": str(pki / f"{client}.crt"),
                    "client-key": str(pki / f"{client}.key"),
                },
            }
        ],
        "contexts": [{"name": "ephemera-local", "context": {"cluster": "ephemera-local", "user": client}}],
        "current-context": "ephemera-local",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


def write_token_kubeconfig(path: Path, server: str, ca: Path, token: str) -> None:
    """A kubeconfig that authenticates with a bearer token (a ServiceAccount's, for RBAC proofs)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ephemera-local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "ephemera-local", "context": {"cluster": "ephemera-local", "user": "token"}}],
        "current-context": "ephemera-local",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


@dataclass
class ControlPlane:
    """One local control plane, its processes and its files under `state_dir`."""

    state_dir: Path
    bin_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    args: dict[str, list[str]] = field(default_factory=dict)
    api_port: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    def _spawn(self, name: str, args: list[str]) -> None:
        self.args[name] = args
        log = (self.state_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [str(self.bin_dir / args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the shell that started it; stopped by `down`
        )
        log.close()
        self.processes[name] = proc
        (self.state_dir / f"{name}.pid").write_text(str(proc.pid))

    def start(self, timeout: float = 120.0) -> None:
        """Start etcd, kube-apiserver and kube-controller-manager, and wait until /readyz is ok."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        generate_pki(self.pki)
        etcd_port, peer_port = free_port(), free_port()
        self.api_port = free_port()
        cm_port = free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn(
            "etcd",
            [
                "etcd",
                "--name=ephemera",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=ephemera=http://127.0.0.1:{peer_port}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            [
                "kube-apiserver",
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--v=0",
            ],
        )
        write_kubeconfig(self.kubeconfig, self.server, pki, "admin")
        cm_kubeconfig = self.state_dir / "controller-manager.kubeconfig"
        write_kubeconfig(cm_kubeconfig, self.server, pki, "controller-manager")
        self.wait_ready(timeout)
        self._spawn(
            "kube-controller-manager",
            [
                "kube-controller-manager",
                f"--kubeconfig={cm_kubeconfig}",
                f"--authentication-kubeconfig={cm_kubeconfig}",
                f"--authorization-kubeconfig={cm_kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={cm_port}",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--v=0",
            ],
        )
        self._start_workloads()
        (self.state_dir / "server").write_text(self.server)

    def _start_workloads(self) -> None:
        """kube-scheduler, kwok and its fake nodes: pods are bound and marked Running as on real nodes."""
        scheduler_kubeconfig = self.state_dir / "scheduler.kubeconfig"
        write_kubeconfig(scheduler_kubeconfig, self.server, self.pki, "scheduler")
        self._spawn(
            "kube-scheduler",
            [
                "kube-scheduler",
                f"--kubeconfig={scheduler_kubeconfig}",
                f"--authentication-kubeconfig={scheduler_kubeconfig}",
                f"--authorization-kubeconfig={scheduler_kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=0",
            ],
        )
        stages = sorted((self.bin_dir / "kwok-stages").glob("*.yaml"))
        config = self.state_dir / "kwok.yaml"
        config.write_text(json.dumps(KWOK_OPTIONS) + "\n")
        self._spawn(
            "kwok",
            [
                "kwok",
                f"--kubeconfig={self.kubeconfig}",
                *(f"--config={path}" for path in [config, *stages, KWOK_STAGES]),
            ],
        )
        for index in range(NODES):
            self.api("POST", "/api/v1/nodes", fake_node(f"kwok-node-{index}"))

    def api(self, method: str, path: str, body: object | None = None) -> object:
        """One request to the API server as the admin; the decoded answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.server}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, context=self._ssl_context(), timeout=10) as answer:
            return json.loads(answer.read() or b"{}")

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.server}/readyz", context=self._ssl_context(), timeout=2) as r:
                return bool(r.status == 200 and r.read().strip() == b"ok")
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    tail = (self.state_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
            if self.ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver not ready within {timeout} s; see {self.state_dir}/*.log")

    def stop(self) -> None:
        stop_state_dir(self.state_dir)
        self.processes.clear()

    def kill(self, *names: str) -> None:
        """Stop some of the processes abruptly (SIGKILL), as a crash would."""
        for name in names:
            proc = self.processes.pop(name)
            proc.kill()
            proc.wait()
            (self.state_dir / f"{name}.pid").unlink(missing_ok=True)

    def revive(self, *names: str, timeout: float = 120.0) -> None:
        """Start killed processes again with their old flags (same ports and data), and wait for /readyz."""
        for name in names:
            self._spawn(name, self.args[name])
        self.wait_ready(timeout)


# kwok's options: it manages the nodes carrying the annotation, allocates pod IPs from POD_CIDR, and
# serves nothing (no port of its own).
KWOK_OPTIONS = {
    "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
    "kind": "KwokConfiguration",
    "options": {
        "cidr": POD_CIDR,
        "nodeIP": "10.243.0.1",
        "nodePort": 0,
        "manageAllNodes": False,
        "manageNodesWithAnnotationSelector": "kwok.x-k8s.io/node=fake",
        "podPlayStageParallelism": 8,
        "nodePlayStageParallelism": 2,
        "nodeLeaseParallelism": 2,
        "podsOnNodeSyncParallelism": 2,
        "nodeLeaseDurationSeconds": 40,
        "enablePodsOnNodeSyncListPager": False,
        "enablePodsOnNodeSyncStreamWatch": True,
    },
}


def fake_node(name: str) -> dict[str, object]:
    """A Node for kwok to play: big enough that quotas, never the node, limit what runs."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok"},
        },
        "status": {
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "500", "ephemeral-storage": "1Ti"},
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "500", "ephemeral-storage": "1Ti"},
        },
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still answers kill(0); reap it if so.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def stop_state_dir(state_dir: Path, grace: float = 15.0) -> None:
    """Stop every process recorded in `state_dir`: the API server's clients first, etcd last."""
    for name in PROCESSES:
        pid_file = state_dir / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        pid_file.unlink()


@contextlib.contextmanager
def running(state_dir: Path) -> Iterator[ControlPlane]:
    """Start a control plane in `state_dir` (built if needed) and stop it on exit."""
    plane = ControlPlane(state_dir=state_dir, bin_dir=tools_dir())
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__.split("\n")[0] if __doc__ else "")
    parser.add_argument("action", choices=["up", "down", "build"])
    parser.add_argument("state_dir", type=Path, nargs="?", default=REPO_ROOT / ".cluster")
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir.resolve()
    if args.action == "build":
        print(tools_dir())
        return 0
    if args.action == "down":
        stop_state_dir(state_dir)
        print(f"control plane in {state_dir} stopped")
        return 0
    if (state_dir / "server").exists() and any(state_dir.glob("*.pid")):
        plane = ControlPlane(state_dir=state_dir, bin_dir=tools_dir(build=False))
        plane.api_port = int((state_dir / "server").read_text().rsplit(":", 1)[1])
        if plane.ready():
            print(f"# control plane already running at {plane.server}", file=sys.stderr)
            print("\n".join(shell_exports(plane.kubeconfig, plane.bin_dir)))
            return 0
        stop_state_dir(state_dir)
    shutil.rmtree(state_dir, ignore_errors=True)
    plane = ControlPlane(state_dir=state_dir, bin_dir=tools_dir())
    started = time.monotonic()
    try:
        plane.start()
    except Exception:
        plane.stop()
        raise
    print(f"# control plane ready at {plane.server} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    print("\n".join(shell_exports(plane.kubeconfig, plane.bin_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
