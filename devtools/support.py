"""Helpers shared by the tests: waiting on conditions, kubectl, and running Ephemera's processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.controlplane import REPO_ROOT, free_port


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or check}; last value {last!r}")


@dataclass
class Kubectl:
    binary: Path
    kubeconfig: Path

    def run(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            input=input,
            timeout=60,
        )

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def apply(self, manifest: dict[str, Any] | str, check: bool = True) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self.run("apply", "-f", "-", input=text, check=check)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """Stop a process as Kubernetes stops a pod: SIGTERM, then SIGKILL if it is still there after `grace`
    seconds (a shutdown that hangs must not hang the test run)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Process:
    """One of Ephemera's processes (`ephemera operator` or `ephemera webhook`) under test."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = field(default=0)

    def start(self) -> Process:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ephemera.cli", *self.args],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        log.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_about(self, names: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each JSON log line about one of the objects `names`, with its object's name, in order."""
        wanted = set(names)
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a log line (a traceback's continuation)
            name = (record.get("object") or {}).get("name") if isinstance(record, dict) else None
            if name in wanted:
                yield name, record


def process_env(kubeconfig: Path, tmp: Path, **overrides: str) -> dict[str, str]:
    env = {
        "KUBECONFIG": str(kubeconfig),
        "EPHEMERA_KUBECONFIG": str(kubeconfig),
        "EPHEMERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'ephemera.db'}",
        "EPHEMERA_LOG_FORMAT": "json",
        "EPHEMERA_OPERATOR_PORT": str(free_port()),
        "EPHEMERA_WEBHOOK_PORT": str(free_port()),
        # The backstop lists PRs and deliveries on the shared local GitHub, which other tests count
        # calls on: off unless a test (tests/test_backstop.py) turns it on.
        "EPHEMERA_BACKSTOP_ENABLED": "false",
    }
    env.update(overrides)
    return env


# What the reliability scenarios did and found, printed by `make soak` (tests/conftest.py).
SOAK: Counter[str] = Counter()

FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "github"


def fixture_payload(event: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "payloads" / event / name).read_text())
    return data


def sign(secret: str, body: bytes) -> str:
    import hashlib
    import hmac

    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class Answer:
    status: int
    body: dict[str, Any]


def post_webhook(
    port: int,
    event: str,
    payload: dict[str, Any] | bytes,
    *,
    secret: str | None,
    delivery: str | None = None,
    content_type: str = "application/json",
    signature: str | None = None,
    raw: bool = False,
) -> Answer:
    """Send one delivery as GitHub does; `signature` overrides the correct one; `raw` sends bytes as they are."""
    import urllib.error
    import urllib.parse
    import urllib.request
    import uuid

    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if content_type == "application/x-www-form-urlencoded" and not raw:
        data = urllib.parse.urlencode({"payload": data.decode()}).encode()
    headers = {
        "Content-Type": content_type,
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "User-Agent": "GitHub-Hookshot/test",
    }
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    elif secret is not None:
        headers["X-Hub-Signature-256"] = sign(secret, data)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Answer(response.status, json.loads(response.read() or b"{}"))
    except urllib.error.HTTPError as err:
        return Answer(err.code, json.loads(err.read() or b"{}"))


def web_ingress(service: str = "web", port: int = 80) -> dict[str, Any]:
    """The Ingress of a PreviewTemplate's app, routing the preview's host to one Service: the tests' and the
    benchmarks' templates share it (a fresh dict a call, so no caller changes another's)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": service},
        "spec": {
            "rules": [
                {
                    "host": "{{ host }}",
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": service, "port": {"number": port}}},
                            }
                        ]
                    },
                }
            ]
        },
    }
