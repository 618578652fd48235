"""`kubectl ephemera`: the installed `kubectl-ephemera` script, found by kubectl's own plugin discovery."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.controlplane import REPO_ROOT, ControlPlane, free_port
from devtools.support import Kubectl
from ephemera.api.models import parse_phase
from ephemera.api.naming import EXPIRES_AT_ANNOTATION, KEEP_ANNOTATION, RETRY_ANNOTATION
from ephemera.kube import Kube, load_api_client
from ephemera.plugin import current_expiry
from ephemera.store.engine import make_engine, upgrade
from ephemera.store.records import Records
from ephemera.transitions import Transition
from tests.test_operator import SHA_A, make_env

VENV_BIN = Path(sys.executable).parent
# The objects here carry made-up statuses: no operator may reconcile them meanwhile.
pytestmark = pytest.mark.usefixtures("operator_paused")


def plugin(
    control_plane: ControlPlane, *args: str, kubeconfig: bool = True, **env: str
) -> subprocess.CompletedProcess[str]:
    """`kubectl ephemera ARGS` with the venv's bin dir on PATH, as a user who installed Ephemera runs it.

    KUBECONFIG is left out of the environment: the plugin must take `--kubeconfig` itself."""
    base = {k: v for k, v in os.environ.items() if k != "KUBECONFIG" and not k.startswith("EPHEMERA_")}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{control_plane.bin_dir}{os.pathsep}{base.get('PATH', '')}"
    flags = [f"--kubeconfig={control_plane.kubeconfig}"] if kubeconfig else []
    return subprocess.run(
        [str(control_plane.bin_dir / "kubectl"), "ephemera", *args, *flags],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def create(kubectl: Kubectl, pr: int, status: dict[str, Any]) -> str:
    name = f"plugin-{uuid.uuid4().hex[:8]}"
    kubectl.apply(make_env(name, pr, repo="octo-org/plugin"))
    patch = json.dumps({"status": status})
    kubectl.run("patch", "pe", name, "--subresource=status", "--type=merge", "-p", patch)
    return name


FAILED: dict[str, Any] = {
    "phase": "Failed",
    "reason": "QuotaExceeded",
    "message": "cpu 64 is above the ceiling of 8",
    "namespace": "pr-7-octo-org-plugin",
    "url": "https://pr-7.preview.example.com",
    "conditions": [
        {
            "type": "Ready",
            "status": "False",
            "reason": "QuotaExceeded",
            "message": "cpu 64 is above the ceiling of 8",
            "lastTransitionTime": "2026-01-01T00:00:02Z",
        }
    ],
}


def test_kubectl_finds_the_plugin_and_lists_environments(
    control_plane: ControlPlane, crd: Path, kubectl: Kubectl
) -> None:
    name = create(kubectl, 7, FAILED)

    table = plugin(control_plane, "list", "--repository", "octo-org/plugin")
    assert table.returncode == 0, table.stderr
    heading, *rows = table.stdout.splitlines()
    assert heading.split() == ["NAME", "REPOSITORY", "PR", "PHASE", "REASON", "AGE", "URL", "POLICY"]
    row = next(r.split() for r in rows if r.startswith(name))
    assert row[1:5] == ["octo-org/plugin", "7", "Failed", "QuotaExceeded"]
    assert row[-2:] == [FAILED["url"], "-"]  # no expiry, queue or pin to say

    wide = plugin(control_plane, "list", "-o", "wide", "--phase", "Failed")
    assert wide.returncode == 0, wide.stderr
    assert wide.stdout.splitlines()[0].split()[-3:] == ["COMMIT", "NAMESPACE", "MESSAGE"]
    line = next(r for r in wide.stdout.splitlines() if r.startswith(name))
    assert SHA_A[:7] in line
    assert FAILED["namespace"] in line
    assert FAILED["message"] in line

    as_json = json.loads(plugin(control_plane, "list", "-o", "json").stdout)
    assert as_json["kind"] == "List"
    assert name in [item["metadata"]["name"] for item in as_json["items"]]
    as_yaml = yaml.safe_load(plugin(control_plane, "-o", "yaml", "list").stdout)
    assert name in [item["metadata"]["name"] for item in as_yaml["items"]]

    # A phase filter that matches nothing lists nothing.
    assert name not in plugin(control_plane, "list", "--phase", "Ready").stdout


def test_plugin_honours_context(control_plane: ControlPlane, crd: Path, kubectl: Kubectl, tmp_path: Path) -> None:
    name = create(kubectl, 8, FAILED)
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    real = config["current-context"]
    # The current context points at a port where nothing listens; only --context reaches the cluster.
    config["clusters"].append({"name": "nowhere", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}})
    config["contexts"].append(
        {"name": "nowhere", "context": {"cluster": "nowhere", "user": config["users"][0]["name"]}}
    )
    config["current-context"] = "nowhere"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))

    refused = plugin(control_plane, "list", f"--kubeconfig={kubeconfig}", kubeconfig=False)
    assert refused.returncode == 1
    assert "error:" in refused.stderr
    listed = plugin(control_plane, "--context", real, "list", f"--kubeconfig={kubeconfig}", kubeconfig=False)
    assert listed.returncode == 0, listed.stderr
    assert name in listed.stdout
    # KUBECONFIG works too, as for kubectl itself.
    from_env = plugin(control_plane, "list", "--context", real, kubeconfig=False, KUBECONFIG=str(kubeconfig))
    assert name in from_env.stdout


def transition(name: str, uid: str, old: str | None, phase: str, reason: str, at: str) -> Transition:
    spec = {"repository": "octo-org/plugin", "pullRequest": 9, "commitSha": SHA_A}
    old_phase = parse_phase(old) if old else None
    return Transition(
        name, uid, 1, spec, old_phase, parse_phase(phase), reason, f"{reason} happened", at, {}, created=at
    )


def test_describe_shows_status_conditions_events_and_records(
    control_plane: ControlPlane, crd: Path, kubectl: Kubectl, tmp_path: Path
) -> None:
    name = create(kubectl, 9, FAILED)
    obj = kubectl.json("get", "pe", name)
    kube = Kube(load_api_client(control_plane.kubeconfig))
    try:
        kube.create_event(obj, "Warning", "QuotaExceeded", "cpu 64 is above the ceiling of 8", "ephemera-operator")
    finally:
        kube.close()
    url = f"sqlite+aiosqlite:///{tmp_path / 'records.db'}"
    upgrade(url)

    async def write() -> None:
        records = Records(make_engine(url))
        uid = obj["metadata"]["uid"]
        await records.write(transition(name, uid, None, "Provisioning", "Created", "2026-01-01T00:00:01Z"))
        await records.write(transition(name, uid, "Provisioning", "Failed", "QuotaExceeded", "2026-01-01T00:00:02Z"))
        await records.engine.dispose()

    asyncio.run(write())

    described = plugin(control_plane, "describe", name, EPHEMERA_DATABASE_URL=url)
    assert described.returncode == 0, described.stderr
    text = described.stdout
    assert "Phase:        Failed" in text
    assert f"URL:          {FAILED['url']}" in text
    conditions = text.split("Conditions:")[1].split("Events:")[0]
    assert "Ready" in conditions
    assert "QuotaExceeded" in conditions
    events = text.split("Events:")[1].split("Records:")[0]
    assert "Warning" in events
    assert "ephemera-operator" in events
    records = text.split("Records:")[1]
    assert "Provisioning -> Failed" in records
    assert "None" not in records

    data = json.loads(plugin(control_plane, "describe", name, "-o", "json", EPHEMERA_DATABASE_URL=url).stdout)
    assert data["object"]["metadata"]["name"] == name
    assert [e["reason"] for e in data["events"]] == ["QuotaExceeded"]
    assert [e["to_phase"] for e in data["records"]["history"][0]["events"]] == ["Provisioning", "Failed"]
    assert (
        yaml.safe_load(plugin(control_plane, "describe", name, "-o", "yaml").stdout)["object"]["spec"]["pullRequest"]
        == 9
    )

    # No database named, or one that does not answer: the cluster's part is shown, and why the records are not.
    unset = plugin(control_plane, "describe", name)
    assert unset.returncode == 0, unset.stderr
    assert "not shown: EPHEMERA_DATABASE_URL is not set" in unset.stdout
    down = f"postgresql+asyncpg://ephemera:secret-pw@127.0.0.1:{free_port()}/ephemera"
    unreachable = plugin(control_plane, "describe", name, EPHEMERA_DATABASE_URL=down)
    assert unreachable.returncode == 0, unreachable.stderr
    assert "not reachable" in unreachable.stdout
    assert "secret-pw" not in unreachable.stdout

    missing = plugin(control_plane, "describe", "no-such-environment")
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_retry_and_open(control_plane: ControlPlane, crd: Path, kubectl: Kubectl, tmp_path: Path) -> None:
    name = create(kubectl, 10, FAILED)
    retried = plugin(control_plane, "retry", name)
    assert retried.returncode == 0, retried.stderr
    annotations = kubectl.json("get", "pe", name)["metadata"].get("annotations") or {}
    assert RETRY_ANNOTATION in annotations

    opened = plugin(control_plane, "open", name)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout.strip() == FAILED["url"]
    # --browser hands the URL to the browser Python's webbrowser finds ($BROWSER): here a script.
    seen = tmp_path / "seen"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\necho "$1" > {seen}\n')
    browser.chmod(0o755)
    in_browser = plugin(control_plane, "open", name, "--browser", BROWSER=f"{browser} %s")
    assert in_browser.returncode == 0, in_browser.stderr
    assert seen.read_text().strip() == FAILED["url"]

    no_url = create(kubectl, 11, {"phase": "Provisioning"})
    refused = plugin(control_plane, "open", no_url)
    assert refused.returncode == 1
    assert "has no URL" in refused.stderr
    assert plugin(control_plane, "retry", "no-such-environment").returncode == 1


def annotations_of(kubectl: Kubectl, name: str) -> dict[str, str]:
    return dict(kubectl.json("get", "pe", name)["metadata"].get("annotations") or {})


def test_keep_and_unkeep(control_plane: ControlPlane, crd: Path, kubectl: Kubectl) -> None:
    name = create(kubectl, 12, {"phase": "Ready"})
    kept = plugin(control_plane, "keep", name)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.strip() == f"previewenvironment.ephemera.dev/{name} kept: it does not expire"
    assert annotations_of(kubectl, name)[KEEP_ANNOTATION] == "true"
    # Kept twice is still kept; -o json prints the object as it is now.
    again = json.loads(plugin(control_plane, "keep", name, "-o", "json").stdout)
    assert again["metadata"]["annotations"][KEEP_ANNOTATION] == "true"

    unkept = plugin(control_plane, "unkeep", name)
    assert unkept.returncode == 0, unkept.stderr
    assert KEEP_ANNOTATION not in annotations_of(kubectl, name)
    as_yaml = yaml.safe_load(plugin(control_plane, "unkeep", name, "-o", "yaml").stdout)
    assert KEEP_ANNOTATION not in (as_yaml["metadata"].get("annotations") or {})

    for command in ("keep", "unkeep"):
        missing = plugin(control_plane, command, "no-such-environment")
        assert missing.returncode == 1
        assert "not found" in missing.stderr


def expiry(kubectl: Kubectl, name: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(annotations_of(kubectl, name)[EXPIRES_AT_ANNOTATION].replace("Z", "+00:00"))


def test_extend_pushes_the_expiry_from_the_later_of_now_and_the_current_one(
    control_plane: ControlPlane, crd: Path, kubectl: Kubectl
) -> None:
    name = create(kubectl, 13, {"phase": "Ready"})
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    extended = plugin(control_plane, "extend", name, "2h")
    after = datetime.datetime.now(datetime.UTC)
    assert extended.returncode == 0, extended.stderr
    first = expiry(kubectl, name)
    # No expiry yet: from now.
    assert before + datetime.timedelta(hours=2) <= first <= after + datetime.timedelta(hours=2)
    assert annotations_of(kubectl, name)[EXPIRES_AT_ANNOTATION] in extended.stdout

    # An expiry in the future: from it, not from now.
    assert plugin(control_plane, "extend", name, "1d").returncode == 0
    assert expiry(kubectl, name) == first + datetime.timedelta(days=1)

    # An expiry in the past: from now.
    past = "2020-01-01T00:00:00Z"
    kubectl.run("annotate", "pe", name, f"{EXPIRES_AT_ANNOTATION}={past}", "--overwrite")
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    assert plugin(control_plane, "extend", name, "30m").returncode == 0
    assert expiry(kubectl, name) >= before + datetime.timedelta(minutes=30)

    for bad in ("soon", "0h", "2x", "2h-"):
        refused = plugin(control_plane, "extend", name, bad)
        assert refused.returncode != 0, bad
        assert "duration" in refused.stderr, (bad, refused.stderr)
    assert plugin(control_plane, "extend", "no-such-environment", "2h").returncode == 1


def test_the_current_expiry_is_the_later_of_the_annotation_and_the_computed_one() -> None:
    # policy-lifecycle's status.expiresAt (last push + TTL) may be later than the annotation: extend
    # counts from it, so that extending never brings an expiry forward.
    obj: dict[str, Any] = {"metadata": {"annotations": {EXPIRES_AT_ANNOTATION: "2026-01-02T00:00:00Z"}}}
    assert current_expiry(obj) == datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    obj["status"] = {"expiresAt": "2026-01-05T00:00:00Z"}
    assert current_expiry(obj) == datetime.datetime(2026, 1, 5, tzinfo=datetime.UTC)
    assert current_expiry({"metadata": {}}) is None


@pytest.mark.parametrize(
    "command",
    [
        [str(VENV_BIN / "ephemera"), "--version"],
        [str(VENV_BIN / "kubectl-ephemera"), "version"],
    ],
)
def test_version_from_one_source(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == f"ephemera {metadata.version('ephemera')}"
