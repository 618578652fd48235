"""Who gets a preview, on the real API server through the signed webhook (and the backstop): drafts,
bots, forks without a writer's approval, opt-in mode and the allowlist get nothing; what stops being
admitted loses its environment; the priority and keep labels are mirrored onto the object.

The webhook runs with an allowlist of one owner, drafts off and GitHub (the local server) to ask for
the approvers' permissions; per-repository differences come from PreviewTemplates' `policy` blocks.
Events are GitHub's example payloads (../shared/fixtures/github/payloads) re-aimed.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.fakegithub import FakeGitHub, Fault
from devtools.support import Answer, Kubectl, Process, fixture_payload, post_webhook, process_env, wait_for
from ephemera.api.naming import (
    APPROVED_BY_ANNOTATION,
    APPROVED_SHA_ANNOTATION,
    CLOSED_REASON_ANNOTATION,
    KEEP_LABEL_ANNOTATION,
    ORIGIN_ANNOTATION,
    PRIORITY_LABEL,
    environment_name,
)
from ephemera.backstop import Backstop
from ephemera.config import Settings
from ephemera.kube import Kube
from ephemera.policy import Policy
from tests.conftest import http_ok
from tests.test_github import INSTALLATION
from tests.test_webhook import get_pe, gone

SECRET = "policy-webhook-secret-0123456789"
OWNER = "policy-org"
WRITER = "maintainer"  # write access to every repository of OWNER
VISITOR = "visitor"  # read access only (anyone GitHub knows)


def sha() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:8]


def repo(prefix: str = "shop") -> str:
    return f"{OWNER}/{prefix}-{uuid.uuid4().hex[:6]}"


def event(
    action: str,
    repository: str,
    number: int,
    head: str,
    updated_at: str,
    *,
    labels: tuple[str, ...] = (),
    draft: bool = False,
    author: str = "octocat",
    bot: bool = False,
    fork: str | None = None,
    label: str | None = None,
    sender: str | None = None,
) -> dict[str, Any]:
    """GitHub's example payload of `action` (opened's for actions without one), re-aimed at a PR."""
    try:
        data = fixture_payload("pull_request", f"{action}.payload.json")
    except FileNotFoundError:
        data = fixture_payload("pull_request", "opened.payload.json")
    data["action"] = action
    data["number"] = number
    data["repository"]["full_name"] = repository
    data["installation"] = {"id": INSTALLATION}
    pr = data["pull_request"]
    template_label = copy.deepcopy(fixture_payload("pull_request", "labeled.payload.json")["label"])
    pr.update(number=number, updated_at=updated_at, draft=draft)
    pr["labels"] = [{**template_label, "name": name} for name in labels]
    pr["user"].update(login=author, type="Bot" if bot else "User")
    pr["head"]["sha"] = head
    pr["base"]["repo"]["full_name"] = repository
    pr["head"]["repo"]["full_name"] = fork or repository
    pr["head"]["repo"]["fork"] = fork is not None
    if label is not None:
        data["label"] = {**template_label, "name": label}
    data["sender"]["login"] = sender or author
    return data


def at(second: int) -> str:
    return f"2026-03-01T10:00:{second:02d}Z"


@pytest.fixture(scope="module")
def templates(kubectl: Kubectl, crd: Path) -> Iterator[dict[str, str]]:
    """Per-repository policies: opt-in mode for one repository, forks approved once for another."""
    repositories = {"optin": repo("optin"), "trusted": repo("trusted")}
    names = {key: f"policy-{key}-{uuid.uuid4().hex[:6]}" for key in repositories}
    policies = {"optin": {"optIn": True}, "trusted": {"reapproveOnPush": False}}
    for key, repository in repositories.items():
        kubectl.apply(
            {
                "apiVersion": "ephemera.dev/v1alpha1",
                "kind": "PreviewTemplate",
                "metadata": {"name": names[key]},
                "spec": {"repositories": [repository], "policy": policies[key]},
            }
        )
    yield repositories
    for name in names.values():
        kubectl.run("delete", "previewtemplate", name, "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def hook(
    crd: Path,
    control_plane: ControlPlane,
    github: FakeGitHub,
    kubectl: Kubectl,
    templates: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Process]:
    """`ephemera webhook` with a policy: an allowlist of OWNER, no drafts, the App to ask GitHub."""
    tmp = tmp_path_factory.mktemp("policy-webhook")
    env = process_env(
        control_plane.kubeconfig,
        tmp,
        EPHEMERA_WEBHOOK_SECRET=SECRET,
        EPHEMERA_WEBHOOK_DRAFT_PRS="false",
        EPHEMERA_POLICY_ALLOW=json.dumps([OWNER]),
        EPHEMERA_GITHUB_API_URL=github.url(""),
        EPHEMERA_GITHUB_APP_ID=str(github.app_id),
        EPHEMERA_GITHUB_PRIVATE_KEY=github.private_key_pem,
    )
    proc = Process(["webhook"], env, tmp / "webhook.log", int(env["EPHEMERA_WEBHOOK_PORT"])).start()
    wait_for(lambda: http_ok(proc, "/readyz"), timeout=60, what="webhook /readyz")
    yield proc
    proc.stop()
    # The objects carry the operator's finalizer and no operator runs here: let them go.
    for obj in kubectl.json("get", "pe")["items"]:
        if str(obj["spec"].get("repository", "")).startswith(f"{OWNER}/"):
            name = obj["metadata"]["name"]
            kubectl.run("patch", "pe", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
            kubectl.run("delete", "pe", name, "--wait=false", "--ignore-not-found", check=False)


def send(hook: Process, data: dict[str, Any]) -> Answer:
    answer = post_webhook(hook.port, "pull_request", data, secret=SECRET)
    assert answer.status == 202, answer
    return answer


def refused(answer: Answer, code: str) -> None:
    assert (answer.body["result"], answer.body.get("policy")) == ("refused", code), answer.body
    assert answer.body["reason"]


def refusals(hook: Process) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{hook.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.findall(r'^ephemera_webhook_policy_refusals_total\{reason="([a-z_]+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


def test_a_draft_gets_nothing_until_it_is_ready_for_review(hook: Process, kubectl: Kubectl) -> None:
    repository, head = repo(), sha()
    name = environment_name(repository, 1)
    before = refusals(hook)
    refused(send(hook, event("opened", repository, 1, head, at(0), draft=True)), "draft")
    refused(send(hook, event("synchronize", repository, 1, sha(), at(1), draft=True)), "draft")
    assert get_pe(kubectl, name) is None
    assert refusals(hook)["draft"] == before["draft"] + 2
    answer = send(hook, event("ready_for_review", repository, 1, head, at(2)))
    assert answer.body["result"] == "created", answer.body
    assert get_pe(kubectl, name) is not None
    # Converted back to a draft: drafts get nothing, so the environment goes.
    answer = send(hook, event("converted_to_draft", repository, 1, head, at(3), draft=True))
    assert (answer.body["result"], answer.body["policy"]) == ("deleted", "draft"), answer.body
    wait_for(lambda: gone(kubectl, name), timeout=30, what="the draft's environment deleted")


def test_a_bots_pr_gets_nothing(hook: Process, kubectl: Kubectl) -> None:
    repository = repo()
    for number, author in enumerate(("dependabot[bot]", "renovate[bot]"), start=1):
        refused(send(hook, event("opened", repository, number, sha(), at(0), author=author, bot=True)), "bot_author")
        assert get_pe(kubectl, environment_name(repository, number)) is None


def test_another_owner_is_not_in_the_allowlist(hook: Process, kubectl: Kubectl) -> None:
    repository = f"stranger-org/shop-{uuid.uuid4().hex[:6]}"
    refused(send(hook, event("opened", repository, 1, sha(), at(0))), "not_allowed")
    assert get_pe(kubectl, environment_name(repository, 1)) is None
    # An allowed owner's PR, as a control.
    allowed = repo()
    assert send(hook, event("opened", allowed, 1, sha(), at(0))).body["result"] == "created"


def test_a_fork_gets_nothing_until_a_writer_approves_and_a_push_needs_approval_again(
    hook: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    repository, head = repo(), sha()
    github.collaborator(repository, WRITER, "write")
    fork = f"outsider/{repository.split('/')[1]}"
    name = environment_name(repository, 3)
    refused(send(hook, event("opened", repository, 3, head, at(0), author="outsider", fork=fork)), "fork_unapproved")
    assert get_pe(kubectl, name) is None

    approved = event(
        "labeled",
        repository,
        3,
        head,
        at(1),
        author="outsider",
        fork=fork,
        labels=("preview-approved",),
        label="preview-approved",
        sender=WRITER,
    )
    answer = send(hook, approved)
    assert answer.body["result"] == "created", answer.body
    obj = get_pe(kubectl, name)
    assert obj is not None
    assert obj["metadata"]["annotations"][APPROVED_SHA_ANNOTATION] == head
    assert obj["metadata"]["annotations"][APPROVED_BY_ANNOTATION] == WRITER
    asked = github.calls_to("GET", rf"/repos/{repository}/collaborators/{WRITER}/permission")
    assert len(asked) == 1

    # A later event at the approved commit keeps it (the approval is read back from the object).
    keep = event(
        "labeled",
        repository,
        3,
        head,
        at(2),
        author="outsider",
        fork=fork,
        labels=("preview-approved", "preview-keep"),
        label="preview-keep",
        sender=WRITER,
    )
    assert send(hook, keep).body["result"] == "updated"

    pushed = event(
        "synchronize", repository, 3, sha(), at(3), author="outsider", fork=fork, labels=("preview-approved",)
    )
    answer = send(hook, pushed)
    assert (answer.body["result"], answer.body["policy"]) == ("deleted", "fork_push_unapproved"), answer.body
    wait_for(lambda: gone(kubectl, name), timeout=30, what="the pushed fork's environment deleted")
    obj = get_pe(kubectl, name)
    assert obj is None or obj["metadata"]["annotations"][CLOSED_REASON_ANNOTATION] == "approval-needed"


def test_an_approval_label_from_someone_without_write_access_is_ignored(
    hook: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    repository, head = repo(), sha()
    fork = f"outsider/{repository.split('/')[1]}"
    github.collaborator(repository, "outsider", "write")  # even an author who can write cannot approve their own
    name = environment_name(repository, 4)
    for labeller, second in ((VISITOR, 1), ("outsider", 2)):
        labelled = event(
            "labeled",
            repository,
            4,
            head,
            at(second),
            author="outsider",
            fork=fork,
            labels=("preview-approved",),
            label="preview-approved",
            sender=labeller,
        )
        refused(send(hook, labelled), "fork_unapproved")
        assert get_pe(kubectl, name) is None
    # The visitor was asked about (and can only read); the author's own label needed no question.
    assert len(github.calls_to("GET", rf"/repos/{repository}/collaborators/{VISITOR}/permission")) == 1
    assert not github.calls_to("GET", rf"/repos/{repository}/collaborators/outsider/permission")


def test_a_push_after_approval_keeps_the_preview_where_configured(
    hook: Process, kubectl: Kubectl, github: FakeGitHub, templates: dict[str, str]
) -> None:
    repository, head, pushed = templates["trusted"], sha(), sha()
    github.collaborator(repository, WRITER, "maintain")
    fork = f"outsider/{repository.split('/')[1]}"
    approved = event(
        "labeled",
        repository,
        5,
        head,
        at(1),
        author="outsider",
        fork=fork,
        labels=("preview-approved",),
        label="preview-approved",
        sender=WRITER,
    )
    assert send(hook, approved).body["result"] == "created"
    push = event(
        "synchronize", repository, 5, pushed, at(2), author="outsider", fork=fork, labels=("preview-approved",)
    )
    assert send(hook, push).body["result"] == "updated"
    obj = get_pe(kubectl, environment_name(repository, 5))
    assert obj is not None
    assert obj["spec"]["commitSha"] == pushed
    assert not obj["metadata"].get("deletionTimestamp")


def test_opt_in_label_creates_and_removing_it_deletes(
    hook: Process, kubectl: Kubectl, templates: dict[str, str]
) -> None:
    repository, head = templates["optin"], sha()
    name = environment_name(repository, 6)
    refused(send(hook, event("opened", repository, 6, head, at(0))), "not_opted_in")
    assert get_pe(kubectl, name) is None
    unrelated = event("labeled", repository, 6, head, at(1), labels=("bug",), label="bug")
    assert send(hook, unrelated).body["result"] == "ignored"

    labelled = event("labeled", repository, 6, head, at(2), labels=("bug", "preview"), label="preview")
    assert send(hook, labelled).body["result"] == "created"
    obj = get_pe(kubectl, name)
    assert obj is not None
    assert PRIORITY_LABEL not in obj["metadata"]["labels"]

    # The priority and keep labels are mirrored onto the object, and taken off with the PR's.
    both = ("preview", "preview-priority", "preview-keep")
    assert (
        send(hook, event("labeled", repository, 6, head, at(3), labels=both, label="preview-keep")).body["result"]
        == "updated"
    )
    obj = get_pe(kubectl, name)
    assert obj is not None
    assert obj["metadata"]["labels"][PRIORITY_LABEL] == "true"
    assert obj["metadata"]["annotations"][KEEP_LABEL_ANNOTATION] == "true"
    less = ("preview", "preview-keep")
    assert (
        send(hook, event("unlabeled", repository, 6, head, at(4), labels=less, label="preview-priority")).body["result"]
        == "updated"
    )
    obj = get_pe(kubectl, name)
    assert obj is not None
    assert PRIORITY_LABEL not in obj["metadata"]["labels"]
    assert obj["metadata"]["annotations"][KEEP_LABEL_ANNOTATION] == "true"

    removed = event("unlabeled", repository, 6, head, at(5), labels=("preview-keep",), label="preview")
    answer = send(hook, removed)
    assert (answer.body["result"], answer.body["policy"]) == ("deleted", "not_opted_in"), answer.body
    wait_for(lambda: gone(kubectl, name), timeout=30, what="the opted-out PR's environment deleted")


def test_the_backstop_creates_nothing_the_policy_refuses(
    github: FakeGitHub, kube: Kube, kubectl: Kubectl, crd: Path
) -> None:
    """One decision for both: of four open PRs with no environment, the backstop makes one."""
    repository = repo("backstop")
    fork = f"outsider/{repository.split('/')[1]}"
    github.pull_request(repository, 1, sha=sha(), labels=("preview-priority",))
    github.pull_request(repository, 2, sha=sha(), author="dependabot[bot]")
    github.pull_request(repository, 3, sha=sha(), draft=True)
    github.pull_request(repository, 4, sha=sha(), head_repository=fork, labels=("preview-approved",))
    settings = Settings(
        github_api_url=github.url(""),
        github_token=SecretStr(github.user_token("backstop")),
        backstop_repositories=[repository],
        webhook_draft_prs=False,
        policy_allow=[OWNER],
    )
    report = Backstop(settings, kube).run()
    assert (report.created, report.refused, report.complete) == (1, 3, True), report.as_dict()
    obj = kube.get_environment(environment_name(repository, 1))
    assert obj is not None
    assert obj["metadata"]["annotations"][ORIGIN_ANNOTATION] == "backstop"
    assert obj["metadata"]["labels"][PRIORITY_LABEL] == "true"
    for number in (2, 3, 4):
        assert kube.get_environment(environment_name(repository, number)) is None
    kubectl.run("patch", "pe", obj["metadata"]["name"], "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    kubectl.run("delete", "pe", obj["metadata"]["name"], "--wait=false")


def test_an_approval_github_cannot_check_now_fails_the_delivery_for_a_redelivery(
    hook: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    """GitHub's 5xx on the permission question is neither a yes nor a no: 503, and nothing written."""
    repository, head = repo(), sha()
    github.collaborator(repository, WRITER, "admin")
    fork = f"outsider/{repository.split('/')[1]}"
    github.inject(Fault(method="GET", path=rf"/repos/{repository}/collaborators/{WRITER}/permission", status=502))
    approved = event(
        "labeled",
        repository,
        8,
        head,
        at(1),
        author="outsider",
        fork=fork,
        labels=("preview-approved",),
        label="preview-approved",
        sender=WRITER,
    )
    failed = post_webhook(hook.port, "pull_request", approved, secret=SECRET, delivery="policy-redelivered-1")
    assert (failed.status, failed.body["error"]) == (503, "github unavailable"), failed
    assert get_pe(kubectl, environment_name(repository, 8)) is None
    # GitHub's redelivery carries the same delivery id and body.
    again = post_webhook(hook.port, "pull_request", approved, secret=SECRET, delivery="policy-redelivered-1")
    assert (again.status, again.body["result"]) == (202, "created"), again


def test_the_charts_policy_values_default_to_the_settings_defaults(
    control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = subprocess.run(
        [str(control_plane.bin_dir / "helm"), "template", "x", str(REPO_ROOT / "charts" / "ephemera")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    defaults = Policy.from_settings(Settings())
    deployments = [doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] == "Deployment"]
    assert len(deployments) == 2
    for doc in deployments:
        env = {e["name"]: e.get("value") for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
        with monkeypatch.context() as patch:
            for name, value in env.items():
                if name.startswith("EPHEMERA_POLICY_"):
                    patch.setenv(name, value)
            assert Policy.from_settings(Settings()) == defaults, doc["metadata"]["name"]
