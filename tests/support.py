"""Helpers shared by the tests: waiting on conditions, kubectl, and running Ephemera's processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ephemera.devtools.controlplane import REPO_ROOT, free_port

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
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
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def process_env(kubeconfig: Path, tmp: Path, **overrides: str) -> dict[str, str]:
    env = {
        "KUBECONFIG": str(kubeconfig),
        "EPHEMERA_KUBECONFIG": str(kubeconfig),
        "EPHEMERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'ephemera.db'}",
        "EPHEMERA_LOG_FORMAT": "json",
        "EPHEMERA_OPERATOR_PORT": str(free_port()),
        "EPHEMERA_WEBHOOK_PORT": str(free_port()),
    }
    env.update(overrides)
    return env
