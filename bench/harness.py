"""What every benchmark needs: a fresh control plane, Ephemera's processes, timing and reporting."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.controlplane import REPO_ROOT, ControlPlane, running
from devtools.fakegithub import FakeGitHub, Server
from devtools.support import Kubectl, Process, process_env, wait_for

RESULTS = REPO_ROOT / "bench" / "results"
SECRET = "bench-webhook-secret"  # 20 bytes: the webhook refuses fewer than 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values) if values else float("nan"),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def report(name: str, rows: list[dict[str, Any]], columns: list[str], *, final: bool = True) -> None:
    """Print a table and write it as JSON under bench/results/; a run's partial results (`final` false)
    replace the latest file but are not kept as a run of their own for bench.summary."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print()
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))
    runs = RESULTS / name
    runs.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"machine": machine(), "at": time.time(), "rows": rows}, indent=2)
    out = RESULTS / f"{name}.json"
    out.write_text(text)
    if final:
        (runs / f"{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(text)  # every run, for bench.summary
    print(f"(written to {out.relative_to(REPO_ROOT)} and {runs.relative_to(REPO_ROOT)}/)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def signed(event: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event).encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {
        "Content-Type": "application/json",
        "X-GitHub-Event": "pull_request",
        "X-Hub-Signature-256": signature,
    }


def pr_event(action: str, repo: str, number: int, sha: str, updated_at: str) -> dict[str, Any]:
    return {
        "action": action,
        "number": number,
        "pull_request": {
            "number": number,
            "updated_at": updated_at,
            "head": {"sha": sha, "ref": f"feature/{number}", "repo": {"full_name": repo}},
            "base": {"ref": "main", "repo": {"full_name": repo}},
            "user": {"login": "octocat"},
            "merged": action == "closed",
        },
        "repository": {"full_name": repo},
        "installation": {"id": 4242},
    }


@dataclass
class Stack:
    plane: ControlPlane
    kubectl: Kubectl
    github: FakeGitHub
    tmp: Path
    operator: Process | None = None
    webhook: Process | None = None

    def start_operator(self, **env: str) -> Process:
        environment = process_env(
            self.plane.kubeconfig,
            self.tmp,
            EPHEMERA_LOG_LEVEL="WARNING",
            EPHEMERA_GITHUB_API_URL=self.github.url(""),
            EPHEMERA_GITHUB_APP_ID=str(self.github.app_id),
            EPHEMERA_GITHUB_PRIVATE_KEY=self.github.private_key_pem,
            **env,
        )
        upgrade = subprocess.run(
            [sys.executable, "-m", "ephemera.cli", "db", "upgrade"],
            env={**os.environ, **environment},
            capture_output=True,
            text=True,
        )
        if upgrade.returncode != 0:  # say why: a bare CalledProcessError hides the cause
            raise RuntimeError(f"ephemera db upgrade failed:\n{upgrade.stdout}{upgrade.stderr}")
        self.operator = Process(
            ["operator"], environment, self.tmp / "operator.log", int(environment["EPHEMERA_OPERATOR_PORT"])
        ).start()
        wait_for(lambda: _http_ok(self.operator, "/healthz"), timeout=60, what="operator")
        return self.operator

    def start_webhook(self) -> Process:
        environment = process_env(
            self.plane.kubeconfig, self.tmp, EPHEMERA_LOG_LEVEL="WARNING", EPHEMERA_WEBHOOK_SECRET=SECRET
        )
        self.webhook = Process(
            ["webhook"], environment, self.tmp / "webhook.log", int(environment["EPHEMERA_WEBHOOK_PORT"])
        ).start()
        wait_for(lambda: _http_ok(self.webhook, "/readyz"), timeout=60, what="webhook")
        return self.webhook


def _http_ok(proc: Process | None, path: str) -> bool:
    import urllib.request

    if proc is None:
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}{path}", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    """A fresh control plane with the CRDs, a local GitHub; processes are started by the benchmark."""
    with tempfile.TemporaryDirectory(prefix="ephemera-bench-") as tmp, running(Path(tmp) / "cp") as plane:
        kubectl = Kubectl(plane.bin_dir / "kubectl", plane.kubeconfig)
        kubectl.run("apply", "-f", str(REPO_ROOT / "crds"))
        kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/previewenvironments.ephemera.dev")
        server = Server(FakeGitHub())
        github = server.start()
        s = Stack(plane, kubectl, github, Path(tmp))
        try:
            yield s
        finally:
            for proc in (s.operator, s.webhook):
                if proc is not None:
                    proc.stop()
            server.stop()


def process_usage(pid: int) -> tuple[float, int]:
    """CPU seconds used so far and resident memory in bytes of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return cpu, rss


class Watcher:
    """Watches PreviewEnvironments (or namespaces) and notes when each reached a phase or went away."""

    def __init__(self, plane: ControlPlane, kind: str = "previewenvironments") -> None:
        import threading

        from kubernetes import client, watch

        from ephemera.kube import load_api_client

        self.ready: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        self._stop = False
        api = load_api_client(plane.kubeconfig)
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)

        def run() -> None:
            # One watch resumed from its last resourceVersion, so that no event falls between two.
            w = watch.Watch()
            version: str | None = None
            while not self._stop:
                lister = (
                    (custom.list_cluster_custom_object, ("ephemera.dev", "v1alpha1", "previewenvironments"))
                    if kind == "previewenvironments"
                    else (core.list_namespace, ())
                )
                kwargs: dict[str, Any] = {"timeout_seconds": 60}
                if version:
                    kwargs["resource_version"] = version
                try:
                    for event in w.stream(lister[0], *lister[1], **kwargs):
                        obj = event["object"]
                        meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata.to_dict()
                        version = meta.get("resource_version") or meta.get("resourceVersion") or version
                        name = meta["name"]
                        now = time.perf_counter()
                        if event["type"] == "DELETED":
                            self.gone.setdefault(name, now)
                        elif isinstance(obj, dict) and (obj.get("status") or {}).get("phase") == "Ready":
                            self.ready.setdefault(name, now)
                        if self._stop:
                            w.stop()
                except Exception:
                    # A broken or expired watch (e.g. 410 Gone once etcd compacted past it) killed the
                    # thread, and the benchmark then waited for Ready events nobody recorded: list again.
                    version = None

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True


def cpu_by_process(s: Stack) -> dict[str, float]:
    """CPU seconds used so far by each process of the stack (this process holds the local GitHub)."""
    pids = {name: proc.pid for name, proc in s.plane.processes.items()}
    for name, proc in (("operator", s.operator), ("webhook", s.webhook)):
        if proc is not None and proc.proc is not None:
            pids[name] = proc.proc.pid
    pids["bench+github"] = os.getpid()
    return {name: process_usage(pid)[0] for name, pid in pids.items()}


def api_requests(s: Stack) -> dict[str, float]:
    """The API server's own count of requests so far, by verb and resource (apiserver_request_total)."""
    text = s.kubectl.run("get", "--raw", "/metrics").stdout
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        fields = dict(part.split("=", 1) for part in labels[len("apiserver_request_total{") : -1].split(","))
        if fields.get("verb", '""') in ('"WATCH"', '"LIST"', '"GET"') and "metrics" in labels:
            continue
        key = f"{fields['verb'].strip(chr(34))} {fields.get('resource', '').strip(chr(34))}"
        key += "/" + fields["subresource"].strip(chr(34)) if fields.get("subresource", '""') != '""' else ""
        counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 2) for k, v in after.items() if v - before.get(k, 0.0) > 0}
