"""A first run that just works: prerequisites checked, `make help`, the PATH line, reused binaries, the build lock."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.support import wait_for

BUILD_TOOLS = REPO_ROOT / "hack" / "build-tools.sh"
CHECK_PREREQS = REPO_ROOT / "hack" / "check-prereqs.sh"
# A PATH with the system's tools but no Go and no kubectl of ours (Debian's /usr/bin/kubectl may be there).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
VERSIONS = dict(
    line.split("=", 1) for line in (REPO_ROOT / "hack/tools/versions.env").read_text().splitlines() if "=" in line
)
BINARIES = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "helm", "promtool"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def test_make_help_lists_every_target() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    phony = {name for line in re.findall(r"^\.PHONY: (.*)$", makefile, re.MULTILINE) for name in line.split()}
    assert targets == phony, "every target is .PHONY and every .PHONY name is a target"
    listed = {line.split()[1] for line in run("make", "--no-print-directory", "help").stdout.splitlines()}
    assert listed == targets


def test_prerequisites_are_named_with_what_to_do(tmp_path: Path) -> None:
    assert run("bash", str(CHECK_PREREQS), "python", sys.executable).returncode == 0
    # A Python that is too old (it answers as 3.9 would).
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.9 ;; *) exit 1 ;; esac\n')
    old.chmod(0o755)
    result = run("bash", str(CHECK_PREREQS), "python", str(old))
    assert result.returncode == 1
    assert "Python 3.9; Ephemera needs 3.11 or newer" in result.stderr
    missing = run("bash", str(CHECK_PREREQS), "python", str(tmp_path / "no-python"))
    assert "not found: install Python 3.11" in missing.stderr
    no_go = run("/bin/bash", str(CHECK_PREREQS), "go", env={"PATH": SYSTEM_PATH})
    assert no_go.returncode == 1
    assert "go not found" in no_go.stderr
    assert "EPHEMERA_TOOLS_DIR" in no_go.stderr
    # A Go older than the pinned modules ask for (it would try to download a newer toolchain).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "go").write_text('#!/bin/sh\n[ "$2" = GOVERSION ] && echo go1.26.0\n')
    (fake / "go").chmod(0o755)
    old_go = run("/bin/bash", str(CHECK_PREREQS), "go", env={"PATH": f"{fake}:{SYSTEM_PATH}"})
    assert old_go.returncode == 1
    assert "go is go1.26.0; the pinned tools (hack/tools/*/go.mod) need Go 1.26." in old_go.stderr


def fresh_cache(tmp_path: Path, tools: Path) -> tuple[Path, Path]:
    """An empty EPHEMERA_CACHE whose bin folder has only kwok (linked), so that a build needs the rest."""
    cache = tmp_path / "cache"
    bindir = Path(run("bash", str(BUILD_TOOLS), "--print", env={"EPHEMERA_CACHE": str(cache)}).stdout.strip())
    bindir.mkdir(parents=True)
    for name in ("kwok", "kwok.version", "kwok-stages"):
        (bindir / name).symlink_to(tools / name)
    return cache, bindir


def test_binaries_of_the_pinned_versions_are_used_instead_of_built(control_plane: ControlPlane, tmp_path: Path) -> None:
    cache, bindir = fresh_cache(tmp_path, control_plane.bin_dir)
    # A kubectl of another version, first in EPHEMERA_TOOLS_DIR: passed over for the right one.
    other = tmp_path / "other"
    other.mkdir()
    (other / "kubectl").write_text("#!/bin/sh\necho 'Client Version: v1.20.0'\n")
    (other / "kubectl").chmod(0o755)
    env = {
        "EPHEMERA_CACHE": str(cache),
        "EPHEMERA_TOOLS_DIR": f"{other}:{control_plane.bin_dir}",
        "PATH": SYSTEM_PATH,  # no Go: any attempt to build fails
    }
    result = run("/bin/bash", str(BUILD_TOOLS), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(bindir)
    assert "a cold build" not in result.stderr
    for name in BINARIES:
        assert (bindir / name).resolve() == (control_plane.bin_dir / name).resolve(), name
    # Run again: the links are current, nothing is looked for or built.
    again = run("/bin/bash", str(BUILD_TOOLS), env=env)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""

    # Without them (and without Go) the build is attempted, and says what is missing.
    for name in BINARIES:
        (bindir / name).unlink()
    refused = run("/bin/bash", str(BUILD_TOOLS), env={"EPHEMERA_CACHE": str(cache), "PATH": SYSTEM_PATH})
    assert refused.returncode != 0
    assert "go not found" in refused.stderr


def test_two_builds_at_once_take_turns_on_the_lock(control_plane: ControlPlane, tmp_path: Path) -> None:
    cache, bindir = fresh_cache(tmp_path, control_plane.bin_dir)
    env = {"EPHEMERA_CACHE": str(cache), "EPHEMERA_TOOLS_DIR": str(control_plane.bin_dir), "PATH": SYSTEM_PATH}
    lock = cache / "build-tools.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    logs = [tmp_path / "first.err", tmp_path / "second.err"]
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = []
        for log in logs:
            with log.open("w") as err:
                procs.append(
                    subprocess.Popen(
                        ["/bin/bash", str(BUILD_TOOLS)], env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=err
                    )
                )
        # Both see the lock taken and wait: neither links anything meanwhile.
        wait_for(
            lambda: all("waiting for it to finish" in log.read_text() for log in logs), timeout=30, what="both to wait"
        )
        assert [proc.poll() for proc in procs] == [None, None]
        assert not (bindir / "kubectl").exists()
        fcntl.flock(held, fcntl.LOCK_UN)
    outputs = [proc.communicate(timeout=60)[0].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [log.read_text() for log in logs]
    assert outputs == [f"{bindir}\n", f"{bindir}\n"]
    errors = [log.read_text() for log in logs]
    # Each binary was linked once, by whichever ran first; the other found the links current.
    assert sum(err.count("instead of building") for err in errors) == len(BINARIES), errors
    assert all((bindir / name).resolve() == (control_plane.bin_dir / name).resolve() for name in BINARIES)


def test_cluster_up_prints_a_path_on_which_our_kubectl_and_helm_come_first(control_plane: ControlPlane) -> None:
    # The session's control plane is running: `up` on its folder only prints the lines.
    up = run(sys.executable, "-m", "devtools.controlplane", "up", str(control_plane.state_dir))
    assert up.returncode == 0, up.stderr
    lines = up.stdout.splitlines()
    assert lines[0] == f"export KUBECONFIG={control_plane.kubeconfig}"
    assert lines[1].startswith("export PATH=")
    # A shell with only the system's PATH (Debian's old kubectl, if any, is in /usr/bin) and no KUBECONFIG.
    checks = [
        "kubectl version --client",
        "helm version --template '{{.Version}}'",
        "echo",
        "kubectl get ns default -o name",
        "command -v kubectl-ephemera",
    ]
    script = "\n".join([*lines, *checks])
    shell = subprocess.run(
        ["/bin/bash", "-c", script],
        env={"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.returncode == 0, shell.stderr
    assert f"Client Version: {VERSIONS['KUBERNETES_VERSION']}" in shell.stdout
    assert VERSIONS["HELM_VERSION"] in shell.stdout
    assert "namespace/default" in shell.stdout
    assert shell.stdout.strip().endswith(str(Path(sys.executable).parent / "kubectl-ephemera"))
