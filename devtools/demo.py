"""`make run`: a local control plane, the operator and the webhook, and a PR becoming an environment
that runs its app (the sample PreviewTemplate), with the app's URL on the PR.

python -m devtools.demo up     start everything (idempotent) and send a signed PR event
python -m devtools.demo down   stop the processes and the control plane
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from devtools.controlplane import REPO_ROOT, free_port, shell_exports, tools_dir
from devtools.controlplane import main as controlplane_main

RUN_DIR = REPO_ROOT / ".run"
CLUSTER_DIR = REPO_ROOT / ".cluster"
KUBECONFIG = CLUSTER_DIR / "kubeconfig"
PROCESSES = ("github", "operator", "webhook")
SAMPLE_TEMPLATE = REPO_ROOT / "deploy" / "samples" / "previewtemplate.yaml"
READY_TIMEOUT = 180.0  # seconds for the app to roll out on the local control plane (a loaded machine)


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _kubectl(*args: str) -> str:
    from devtools.controlplane import tools_dir

    kubectl = tools_dir(build=False) / "kubectl"
    return subprocess.run(
        [str(kubectl), f"--kubeconfig={KUBECONFIG}", *args], check=True, capture_output=True, text=True
    ).stdout


def _alive(name: str) -> bool:
    pid_file = RUN_DIR / f"{name}.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


def _spawn(name: str, args: list[str], env: dict[str, str]) -> None:
    log = (RUN_DIR / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
    )
    (RUN_DIR / f"{name}.pid").write_text(str(proc.pid))


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout} s; see {RUN_DIR}/*.log")


def _config() -> dict[str, str]:
    path = RUN_DIR / "config.json"
    if path.exists():
        data: dict[str, str] = json.loads(path.read_text())
        return data
    config = {
        "secret": secrets.token_hex(16),
        "webhook_port": str(free_port()),
        "operator_port": str(free_port()),
        "github_port": str(free_port()),
    }
    path.write_text(json.dumps(config))
    return config


def sample_event(sha: str) -> dict[str, Any]:
    """A pull_request `opened` delivery as GitHub sends it, trimmed to what matters here."""
    return {
        "action": "opened",
        "number": 42,
        "pull_request": {
            "number": 42,
            "state": "open",
            "draft": False,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "head": {"ref": "feature/checkout", "sha": sha, "repo": {"full_name": "octo-org/shop"}},
            "base": {"ref": "main", "repo": {"full_name": "octo-org/shop"}},
            "user": {"login": "octocat"},
        },
        "repository": {"full_name": "octo-org/shop"},
        "installation": {"id": 4242},
    }


def send(port: int, secret: str, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    body = json.dumps(event).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/webhook",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "pull_request",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def up() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    _say("Local control plane (etcd, kube-apiserver, kube-controller-manager)")
    controlplane_main(["up", str(CLUSTER_DIR)])
    _say("CRDs: PreviewEnvironment and PreviewTemplate")
    print(_kubectl("apply", "-f", str(REPO_ROOT / "crds")), end="")
    _kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/previewenvironments.ephemera.dev",
        "crd/previewtemplates.ephemera.dev",
    )
    _say(f"The PreviewTemplate every octo-org/shop PR runs ({SAMPLE_TEMPLATE.relative_to(REPO_ROOT)})")
    print(_kubectl("apply", "-f", str(SAMPLE_TEMPLATE)), end="")
    print(_kubectl("get", "previewtemplates"), end="")

    config = _config()
    env = {
        "KUBECONFIG": str(KUBECONFIG),
        "EPHEMERA_KUBECONFIG": str(KUBECONFIG),
        "EPHEMERA_LOG_FORMAT": "text",
        "EPHEMERA_WEBHOOK_SECRET": config["secret"],
        "EPHEMERA_WEBHOOK_PORT": config["webhook_port"],
        "EPHEMERA_OPERATOR_PORT": config["operator_port"],
        "EPHEMERA_DATABASE_URL": f"sqlite+aiosqlite:///{RUN_DIR / 'ephemera.db'}",
        "EPHEMERA_GITHUB_API_URL": f"http://127.0.0.1:{config['github_port']}",
        "EPHEMERA_GITHUB_APP_ID": "4242",
        "EPHEMERA_GITHUB_PRIVATE_KEY_FILE": str(RUN_DIR / "github-app.pem"),
    }
    python = sys.executable
    _say("Local GitHub API server (plays GitHub: App tokens, statuses, comments, deployments)")
    if not _alive("github"):
        key = RUN_DIR / "github-app.pem"
        key.unlink(missing_ok=True)
        _spawn(
            "github", [python, "-m", "devtools.fakegithub", "--port", config["github_port"], "--key-file", str(key)], {}
        )
        deadline = time.monotonic() + 30
        while not key.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    _wait_http(f"http://127.0.0.1:{config['github_port']}/_calls")
    print(f"listening on 127.0.0.1:{config['github_port']}")
    _say("Records database (SQLite here; PostgreSQL in production): ephemera db upgrade")
    subprocess.run([python, "-m", "ephemera.cli", "db", "upgrade"], env={**os.environ, **env}, check=True)
    _say("Operator and webhook")
    for name, args in (
        ("operator", [python, "-m", "ephemera.cli", "operator"]),
        ("webhook", [python, "-m", "ephemera.cli", "webhook"]),
    ):
        if _alive(name):
            print(f"{name} already running (pid {(RUN_DIR / f'{name}.pid').read_text()})")
            continue
        _spawn(name, args, env)
        print(f"{name} started, log in {RUN_DIR / f'{name}.log'}")
    _wait_http(f"http://127.0.0.1:{config['operator_port']}/healthz")
    _wait_http(f"http://127.0.0.1:{config['webhook_port']}/readyz")

    sha = hashlib.sha1(str(time.time()).encode()).hexdigest()
    _say("GitHub sends a signed pull_request 'opened' event for octo-org/shop#42")
    started = time.monotonic()
    code, answer = send(int(config["webhook_port"]), config["secret"], sample_event(sha))
    print(f"webhook answered {code}: {json.dumps(answer)}")
    name = str(answer.get("name") or "")
    if code != 202 or not name:
        return 1
    _say("The environment and its app rolling out (kwok plays the kubelet: pods start, no image is pulled)")
    status = follow(name, started, READY_TIMEOUT)
    phase = str(status.get("phase") or "")
    print(f"{name} is {phase or 'not reconciled'} after {time.monotonic() - started:.2f} s")
    if status.get("message"):
        print(status["message"])
    if phase != "Ready":
        _say("It did not become Ready: the end of each process's log")
        for log in sorted(RUN_DIR.glob("*.log")):
            print(f"--- {log} (last 20 lines)")
            print("\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    _say("kubectl get previewenvironments -o wide (the URL column)")
    print(_kubectl("get", "previewenvironments", "-o", "wide"), end="")
    namespace = str(status.get("namespace") or "")
    if namespace:
        _say(f"What the environment's namespace holds (kubectl -n {namespace} get ...)")
        print(_kubectl("-n", namespace, "get", "resourcequota,limitrange,networkpolicy"), end="")
        _say(f"The app from the template (kubectl -n {namespace} get deployments,replicasets,pods,services,ingresses)")
        print(_kubectl("-n", namespace, "get", "deployments,replicasets,pods,services,ingresses", "-o", "wide"), end="")
        _say(f"How it rolled out (kubectl -n {namespace} get events)")
        print(
            _kubectl(
                "-n",
                namespace,
                "get",
                "events",
                "--sort-by=.metadata.creationTimestamp",
                "-o",
                "custom-columns=AT:.metadata.creationTimestamp,OBJECT:.involvedObject.name,REASON:.reason,MESSAGE:.message",
            ),
            end="",
        )
    if status.get("url"):
        _say(f"The preview's URL: {status['url']}")
    _say("What the local GitHub server received (commit status, sticky comment, deployment: each with the URL)")
    github_calls(int(config["github_port"]), "octo-org/shop")
    _say("Try it yourself")
    print("\n".join(shell_exports(KUBECONFIG, tools_dir(build=False))))
    print("kubectl get pe -w            # watch the phases")
    print(f"kubectl delete pe {name}     # tear the environment down")
    print("make run-down                # stop the operator, the webhook and the control plane")
    return 0 if phase == "Ready" else 1


def _rollout(namespace: str) -> str:
    """The app's progress in one line: each Deployment's available replicas, and the pods' states."""
    items = json.loads(_kubectl("-n", namespace, "get", "deployments,pods", "-o", "json"))["items"]
    parts = []
    for item in items:
        if item["kind"] == "Deployment":
            st = item.get("status") or {}
            want = (item.get("spec") or {}).get("replicas", 1)
            available = any(
                c.get("type") == "Available" and c.get("status") == "True" for c in st.get("conditions") or []
            )
            parts.append(
                f"Deployment {item['metadata']['name']}: {st.get('updatedReplicas', 0)}/{want} updated, "
                f"{st.get('availableReplicas', 0)}/{want} available{' (Available)' if available else ''}"
            )
    phases: dict[str, int] = {}
    for item in items:
        if item["kind"] == "Pod":
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True" for c in item["status"].get("conditions") or []
            )
            state = f"{item['status'].get('phase', 'Pending')}{' ready' if ready else ''}"
            phases[state] = phases.get(state, 0) + 1
    if phases:
        parts.append("pods: " + ", ".join(f"{n} {state}" for state, n in sorted(phases.items())))
    return "; ".join(parts)


def follow(name: str, started: float, timeout: float) -> dict[str, Any]:
    """Print each change of the environment's phase and of its app's rollout; its status once Ready or Failed."""
    deadline = time.monotonic() + timeout
    last = ""
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = json.loads(_kubectl("get", "pe", name, "-o", "json")).get("status") or {}
        line = f"{status.get('phase', 'Pending')} ({status.get('reason') or '-'})"
        if status.get("namespace") and status.get("inventory"):
            line += f"  {_rollout(str(status['namespace']))}"
        if line != last:
            print(f"{time.monotonic() - started:7.2f} s  {line}")
            last = line
        if status.get("phase") in ("Ready", "Failed"):
            break
        time.sleep(0.2)
    return status


def github_calls(port: int, repo: str, timeout: float = 15) -> None:
    """Print the calls about `repo` once the Ready report has landed."""
    deadline = time.monotonic() + timeout
    calls: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_calls", timeout=5) as response:
            calls = [c for c in json.loads(response.read()) if f"/repos/{repo}/" in c["path"] or "/app/" in c["path"]]
        done = any(
            c["method"] == "POST" and "/statuses/" in c["path"] and (c["body"] or {}).get("state") == "success"
            for c in calls
        )
        if done and any("/comments" in c["path"] and c["method"] in ("POST", "PATCH") for c in calls):
            break
        time.sleep(0.2)
    for call in calls:
        body = call["body"] or {}
        detail = body.get("state") or (body.get("body", "").split("\n")[1] if body.get("body") else "")
        url = body.get("target_url") or body.get("environment_url")
        if not url and body.get("body"):  # the comment's table row with the URL
            url = next((line for line in str(body["body"]).splitlines() if line.startswith("| URL |")), None)
        print(f"{call['status']} {call['method']:5} {call['path']}  {detail}{f'  {url}' if url else ''}")


def down() -> int:
    for name in PROCESSES:
        pid_file = RUN_DIR / f"{name}.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            pid_file.unlink()
    controlplane_main(["down", str(CLUSTER_DIR)])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("action", choices=["up", "down"], nargs="?", default="up")
    args = parser.parse_args(argv)
    return up() if args.action == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
