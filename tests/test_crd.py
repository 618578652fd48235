"""The PreviewEnvironment CRD on the real API server, and the pydantic models that mirror it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from devtools.controlplane import REPO_ROOT
from devtools.support import Kubectl, wait_for
from ephemera.api.models import (
    CONDITION_MESSAGE_MAX,
    CONDITION_REASON_MAX,
    CONDITION_REASON_PATTERN,
    CONDITION_TYPE_PATTERN,
    Condition,
    Phase,
    PreviewEnvironmentSpec,
    PreviewEnvironmentStatus,
    ready_condition,
)

SAMPLE_PATH = REPO_ROOT / "deploy" / "samples" / "previewenvironment.yaml"
SAMPLE: dict[str, Any] = yaml.safe_load(SAMPLE_PATH.read_text())

# (name, path into spec, bad value, the field the API server must name)
INVALID = [
    ("bad-sha", ("commitSha",), "not-a-sha", "spec.commitSha"),
    ("short-sha", ("commitSha",), "abc123", "spec.commitSha"),
    ("pr-zero", ("pullRequest",), 0, "spec.pullRequest"),
    ("no-owner", ("repository",), "shop", "spec.repository"),
    ("bad-owner", ("repository",), "-octo/shop", "spec.repository"),
    ("slashes", ("repository",), "octo/shop/extra", "spec.repository"),
    ("bad-cpu", ("resources", "cpu"), "two cores", "spec.resources.cpu"),
    ("bad-memory", ("resources", "memory"), "4 GB", "spec.resources.memory"),
    ("negative-memory", ("resources", "memory"), "-1Gi", "spec.resources.memory"),
    ("zero-pods", ("resources", "pods"), 0, "spec.resources.pods"),
]


def _variant(name: str, path: tuple[str, ...], value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(SAMPLE)
    obj["metadata"]["name"] = f"invalid-{name}"
    target = obj["spec"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO_ROOT / "crds" / "previewenvironments.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_crd_is_established_and_sample_applies(crd: Path, kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(SAMPLE_PATH.parent))
    obj = kubectl.json("get", "previewenvironment", SAMPLE["metadata"]["name"])
    assert obj["spec"] == SAMPLE["spec"]
    kubectl.run("delete", "-f", str(SAMPLE_PATH.parent), "--wait=false")


READY_FALSE = {
    "type": "Ready",
    "status": "False",
    "reason": "RolloutFailed",
    "message": "Deployment web: CrashLoopBackOff",
    "lastTransitionTime": "2026-01-01T00:00:00Z",
    "observedGeneration": 1,
}


def _columns(kubectl: Kubectl, name: str, *wide: str) -> dict[str, str]:
    """`kubectl get pe NAME` (with `wide`: `-o wide`) as column -> value, split where the header's columns begin."""
    header, row = kubectl.run("get", "pe", name, *wide).stdout.rstrip("\n").splitlines()
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    bounds = zip(starts, [*starts[1:], None], strict=True)
    return {header[a:b].strip(): row[a:b].strip() for a, b in bounds}


def test_get_prints_printer_columns(crd: Path, kubectl: Kubectl) -> None:
    obj = _variant("columns", ("pullRequest",), 7)
    kubectl.apply(obj)
    name = obj["metadata"]["name"]
    status = {
        "phase": "Failed",
        "reason": "RolloutFailed",
        "message": "Deployment web: CrashLoopBackOff",
        "namespace": "pr-7-x",
        "commit": "9f2c6d1",
        "url": "https://pr-7.preview.example.com/",
        "conditions": [READY_FALSE],
    }
    kubectl.run("patch", "pe", name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))

    def columns_match() -> bool:
        # An operator may be running and write its own status: the row must show whatever is there.
        columns = _columns(kubectl, name)
        wide = _columns(kubectl, name, "-o", "wide")
        found = kubectl.json("get", "pe", name).get("status") or {}
        ready: dict[str, Any] = next((c for c in found.get("conditions") or [] if c["type"] == "Ready"), {})
        assert list(columns) == ["NAME", "REPOSITORY", "PR", "COMMIT", "PHASE", "READY", "REASON", "URL", "AGE"]
        assert list(wide) == [
            "NAME", "REPOSITORY", "PR", "COMMIT", "PHASE", "READY", "REASON", "NAMESPACE", "URL", "AGE", "MESSAGE"
        ]  # fmt: skip
        want = {
            "NAME": name,
            "REPOSITORY": "octo-org/shop",
            "PR": "7",
            "COMMIT": found.get("commit"),
            "PHASE": found.get("phase"),
            "READY": ready.get("status"),
            "REASON": ready.get("reason"),
            "URL": found.get("url") or "<none>",
        }
        wide_want = {**want, "NAMESPACE": found.get("namespace"), "MESSAGE": ready.get("message")}
        return all(columns[k] == v for k, v in want.items()) and all(wide[k] == v for k, v in wide_want.items())

    wait_for(columns_match, timeout=30, what="the printer columns to show the object")
    # Unless an operator wrote its own status meanwhile, the row shows what was patched.
    columns = _columns(kubectl, name, "-o", "wide")
    if columns["PHASE"] == "Failed":
        assert (columns["READY"], columns["REASON"]) == ("False", "RolloutFailed")
        assert columns["MESSAGE"] == "Deployment web: CrashLoopBackOff"
        assert columns["URL"] == "https://pr-7.preview.example.com/"
    # The short names work too.
    assert name in kubectl.run("get", "preview").stdout
    kubectl.run("delete", "pe", name, "--wait=false")


# (name, the change to a valid condition (None: left out), the field the API server must name)
BAD_CONDITIONS: list[tuple[str, dict[str, Any], str]] = [
    ("no-reason", {"reason": None}, "reason"),
    ("no-message", {"message": None}, "message"),
    ("no-time", {"lastTransitionTime": None}, "lastTransitionTime"),
    ("spaced-reason", {"reason": "Rollout failed"}, "reason"),
    ("bad-status", {"status": "Maybe"}, "status"),
]


@pytest.mark.parametrize(("case", "change", "field"), BAD_CONDITIONS, ids=[c[0] for c in BAD_CONDITIONS])
def test_conditions_follow_metav1_condition(
    crd: Path, kubectl: Kubectl, case: str, change: dict[str, Any], field: str
) -> None:
    """The API server refuses a condition that metav1.Condition refuses, naming the field; the model too."""
    obj = _variant(f"condition-{case}", ("pullRequest",), 8)
    kubectl.apply(obj)
    name = obj["metadata"]["name"]
    condition = {k: v for k, v in {**READY_FALSE, **change}.items() if v is not None}
    patch = json.dumps({"status": {"phase": "Failed", "conditions": [condition]}})
    result = kubectl.run("patch", "pe", name, "--subresource=status", "--type=merge", "-p", patch, check=False)
    kubectl.run("delete", "pe", name, "--wait=false")
    assert result.returncode != 0
    assert f"status.conditions[0].{field}" in result.stderr
    with pytest.raises(ValidationError):
        PreviewEnvironmentStatus.model_validate({"phase": "Failed", "conditions": [condition]})
    assert PreviewEnvironmentStatus.model_validate({"phase": "Failed", "conditions": [READY_FALSE]}).conditions


@pytest.mark.parametrize(("case", "path", "value", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_objects_are_refused_naming_the_field(
    crd: Path, kubectl: Kubectl, case: str, path: tuple[str, ...], value: Any, field: str
) -> None:
    result = kubectl.apply(_variant(case, path, value), check=False)
    assert result.returncode != 0
    assert "is invalid" in result.stderr
    assert field in result.stderr
    assert kubectl.run("get", "pe", f"invalid-{case}", check=False).returncode != 0


@pytest.mark.parametrize(("case", "path", "value", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_models_refuse_what_the_crd_refuses(case: str, path: tuple[str, ...], value: Any, field: str) -> None:
    with pytest.raises(ValidationError):
        PreviewEnvironmentSpec.model_validate(_variant(case, path, value)["spec"])


def test_models_accept_the_sample() -> None:
    spec = PreviewEnvironmentSpec.model_validate(SAMPLE["spec"])
    assert spec.to_k8s() == SAMPLE["spec"]


def test_models_have_the_crds_fields() -> None:
    schema = _crd_schema()["properties"]
    spec_fields = {f.alias or name for name, f in PreviewEnvironmentSpec.model_fields.items()}
    status_fields = {f.alias or name for name, f in PreviewEnvironmentStatus.model_fields.items()}
    assert spec_fields == set(schema["spec"]["properties"])
    assert status_fields == set(schema["status"]["properties"])
    assert set(schema["spec"]["required"]) == {
        f.alias or name for name, f in PreviewEnvironmentSpec.model_fields.items() if f.is_required()
    }


def test_the_condition_model_is_the_crds() -> None:
    items = _crd_schema()["properties"]["status"]["properties"]["conditions"]["items"]
    fields = Condition.model_fields
    assert {f.alias or name for name, f in fields.items()} == set(items["properties"])
    assert {f.alias or name for name, f in fields.items() if f.is_required()} == set(items["required"])
    assert items["properties"]["type"]["pattern"] == CONDITION_TYPE_PATTERN
    assert items["properties"]["reason"]["pattern"] == CONDITION_REASON_PATTERN
    assert items["properties"]["reason"]["maxLength"] == CONDITION_REASON_MAX
    assert items["properties"]["message"]["maxLength"] == CONDITION_MESSAGE_MAX


def test_the_ready_condition_follows_the_phase_and_keeps_its_time_while_its_status_holds() -> None:
    def enter(phase: Phase, reason: str, at: str, previous: list[Condition]) -> Condition:
        return ready_condition(phase, reason, f"{phase.value} now", generation=2, at=at, previous=previous)

    provisioning = enter(Phase.PROVISIONING, "Provisioning", "2026-01-01T00:00:01Z", [])
    assert (provisioning.status, provisioning.last_transition_time) == ("False", "2026-01-01T00:00:01Z")
    failed = enter(Phase.FAILED, "RolloutFailed", "2026-01-01T00:00:09Z", [provisioning])
    assert (failed.status, failed.reason, failed.message) == ("False", "RolloutFailed", "Failed now")
    assert failed.last_transition_time == "2026-01-01T00:00:01Z"  # still False: its time stays
    ready = enter(Phase.READY, "Ready", "2026-01-01T00:00:20Z", [failed])
    assert (ready.status, ready.last_transition_time, ready.observed_generation) == ("True", "2026-01-01T00:00:20Z", 2)
    for phase in Phase:
        assert enter(phase, "Because", "2026-01-01T00:00:30Z", [ready]).status == (
            "True" if phase is Phase.READY else "False"
        )
    # A reason metav1 would refuse is made one, so that the status write cannot fail on it.
    assert enter(Phase.FAILED, "2 bad-reason,", "2026-01-01T00:00:40Z", []).reason == "badreason"
    assert enter(Phase.FAILED, "--", "2026-01-01T00:00:40Z", []).reason == "Failed"


def test_every_schema_field_has_a_description() -> None:
    def walk(node: dict[str, Any], path: str) -> list[str]:
        missing = [] if "description" in node or path in ("", ".metadata") else [path]
        for key, child in (node.get("properties") or {}).items():
            missing += walk(child, f"{path}.{key}")
        if "items" in node:
            missing += walk(node["items"], f"{path}[]")[1:] if "description" not in node["items"] else []
        return missing

    assert walk(_crd_schema(), "") == []


def test_explain_shows_descriptions(crd: Path, kubectl: Kubectl) -> None:
    out = wait_for(
        lambda: kubectl.run("explain", "previewenvironment.spec", check=False).stdout,
        timeout=30,
        what="kubectl explain to find the published schema",
    )
    assert "The pull request this environment previews" in out
    assert "commitSha" in out
    assert "40-character hexadecimal SHA" in out


def test_deleting_a_namespace_with_objects_finishes(control_plane: Any, kubectl: Kubectl) -> None:
    """Proof that the controller manager runs: a namespace holding objects is emptied and goes."""
    kubectl.run("create", "namespace", "cm-proof")
    kubectl.run("-n", "cm-proof", "create", "configmap", "held", "--from-literal=a=b")
    kubectl.run("-n", "cm-proof", "create", "quota", "q", "--hard=pods=2")
    kubectl.run("delete", "namespace", "cm-proof", "--wait=false")
    wait_for(
        lambda: kubectl.run("get", "namespace", "cm-proof", check=False).returncode != 0,
        timeout=60,
        what="namespace cm-proof to be gone",
    )


def test_repository_and_pull_request_cannot_change(crd: Path, kubectl: Kubectl) -> None:
    """Both name the environment's namespace: an edit would leave the old one behind, so the API
    server refuses it with a message; the other fields still change."""
    obj = _variant("immutable", ("pullRequest",), 9)
    name = obj["metadata"]["name"]
    kubectl.apply(obj)
    for change, field in (({"repository": "octo-org/elsewhere"}, "repository"), ({"pullRequest": 10}, "pullRequest")):
        result = kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": change}), check=False)
        assert result.returncode != 0, f"spec.{field} was changed"
        assert f"spec.{field} is immutable" in result.stderr
        assert "create one for the other" in result.stderr
    spec = kubectl.json("get", "pe", name)["spec"]
    assert (spec["repository"], spec["pullRequest"]) == (SAMPLE["spec"]["repository"], 9)
    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": "b" * 40}}))
    assert kubectl.json("get", "pe", name)["spec"]["commitSha"] == "b" * 40
    kubectl.run("delete", "pe", name, "--wait=false")
