"""The webhook turns signed GitHub deliveries into PreviewEnvironments, and refuses everything else."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.controlplane import REPO_ROOT, ControlPlane, free_port, write_kubeconfig
from devtools.support import FIXTURES, Kubectl, Process, fixture_payload, post_webhook, process_env, wait_for
from ephemera.api.naming import DELIVERY_ANNOTATION as DELIVERY
from ephemera.api.naming import FINALIZER, environment_name
from ephemera.api.naming import PR_UPDATED_AT_ANNOTATION as UPDATED_AT
from tests.conftest import WEBHOOK_SECRET, http_ok

REPO = "Codertocat/Hello-World"


def pr_event(action: str, *, repo: str, number: int, sha: str, updated_at: str, **pr: Any) -> dict[str, Any]:
    """GitHub's own `opened` example, re-aimed at another repository, PR, commit and time."""
    event = fixture_payload("pull_request", "opened.payload.json")
    event["action"] = action
    event["number"] = number
    event["repository"]["full_name"] = repo
    event["pull_request"].update(number=number, updated_at=updated_at, **pr)
    event["pull_request"]["head"]["sha"] = sha
    return event


def get_pe(kubectl: Kubectl, name: str) -> dict[str, Any] | None:
    result = kubectl.run("get", "pe", name, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def all_pe_names(kubectl: Kubectl) -> set[str]:
    return {o["metadata"]["name"] for o in kubectl.json("get", "pe")["items"]}


def created_since(kubectl: Kubectl, before: set[str]) -> set[str]:
    """The objects that exist now and were not in `before`. Not an equality of the two listings: the
    session's operator removes the finalizer of other tests' deleted objects whenever their teardown
    ends, and one that ended between the two listings would read as a change."""
    return all_pe_names(kubectl) - before


def gone(kubectl: Kubectl, name: str) -> bool:
    obj = get_pe(kubectl, name)
    return obj is None or bool(obj["metadata"].get("deletionTimestamp"))


def test_github_example_payloads_replayed(webhook: Process, kubectl: Kubectl) -> None:
    """Every example payload GitHub publishes, signed and sent in turn; the object checked field by field."""
    name = environment_name(REPO, 2)
    results = {}
    order = sorted(
        (FIXTURES / "payloads" / "pull_request").glob("*.json"),
        key=lambda p: (not p.name.startswith("opened"), p.name.startswith("closed"), p.name),
    )
    for path in order:
        answer = post_webhook(webhook.port, "pull_request", json.loads(path.read_text()), secret=WEBHOOK_SECRET)
        results[path.name] = answer
        assert answer.status == 202, (path.name, answer)
        if path.name == "opened.payload.json":
            obj = get_pe(kubectl, name)
            assert obj is not None
            assert obj["spec"] == {
                "repository": REPO,
                "pullRequest": 2,
                "commitSha": "ec26c3e57ca3a959ca5aad62de7213c562f8c821",
                "branch": "changes",
                "installationId": 1,
                "author": "Codertocat",
                "title": "Update the README with new information.",
            }
            annotations = obj["metadata"]["annotations"]
            assert annotations["ephemera.dev/pr-updated-at"] == "2019-05-15T15:20:33Z"
    assert results["opened.payload.json"].body["result"] == "created"
    assert results["opened.payload.json"].body["name"] == name
    for ignored in ("assigned", "labeled", "locked", "review_requested", "unassigned", "unlabeled", "unlocked"):
        assert results[f"{ignored}.payload.json"].body["result"] == "ignored"
    # The same head and time as `opened`: nothing newer to apply.
    assert results["synchronize.payload.json"].body["result"] == "ignored"
    assert results["closed.payload.json"].body["result"] == "deleted"
    wait_for(lambda: gone(kubectl, name), timeout=30, what="the closed PR's environment to be deleted")

    for path in sorted((FIXTURES / "payloads" / "ping").glob("*.json")):
        answer = post_webhook(webhook.port, "ping", json.loads(path.read_text()), secret=WEBHOOK_SECRET)
        assert (answer.status, answer.body["result"]) == (200, "pong")
    for path in sorted((FIXTURES / "payloads" / "installation").glob("*.json")):
        answer = post_webhook(webhook.port, "installation", json.loads(path.read_text()), secret=WEBHOOK_SECRET)
        assert (answer.status, answer.body["result"]) == (202, "ignored")


def test_form_encoded_delivery_is_accepted(webhook: Process, kubectl: Kubectl) -> None:
    event = pr_event("opened", repo="octo/form", number=5, sha="1" * 40, updated_at="2026-01-01T00:00:00Z")
    answer = post_webhook(
        webhook.port, "pull_request", event, secret=WEBHOOK_SECRET, content_type="application/x-www-form-urlencoded"
    )
    assert (answer.status, answer.body["result"]) == (202, "created")
    assert get_pe(kubectl, environment_name("octo/form", 5)) is not None


def test_a_new_environment_is_born_with_the_operators_finalizer(webhook: Process, kubectl: Kubectl) -> None:
    # Protected from its first moment (and the operator need not add it: one request less per PR).
    event = pr_event("opened", repo="octo/born", number=6, sha="1" * 40, updated_at="2026-01-01T00:00:00Z")
    answer = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET)
    assert (answer.status, answer.body["result"]) == (202, "created")
    obj = get_pe(kubectl, environment_name("octo/born", 6))
    assert obj is not None
    assert FINALIZER in obj["metadata"]["finalizers"]


@pytest.mark.parametrize(
    "signature",
    [None, "", "sha256=" + "0" * 64, "sha1=abc", "sha256=not-hex"],
    ids=["missing", "empty", "wrong", "sha1", "garbage"],
)
def test_bad_signatures_are_refused(webhook: Process, kubectl: Kubectl, signature: str | None) -> None:
    event = pr_event("opened", repo="octo/forged", number=6, sha="2" * 40, updated_at="2026-01-01T00:00:00Z")
    answer = post_webhook(webhook.port, "pull_request", event, secret=None, signature=signature)
    assert answer.status == 401
    assert answer.body["error"] == "invalid signature"
    assert get_pe(kubectl, environment_name("octo/forged", 6)) is None


def test_signature_with_another_secret_is_refused(webhook: Process, kubectl: Kubectl) -> None:
    event = pr_event("opened", repo="octo/forged", number=7, sha="2" * 40, updated_at="2026-01-01T00:00:00Z")
    answer = post_webhook(webhook.port, "pull_request", event, secret="not-the-secret")
    assert answer.status == 401
    assert get_pe(kubectl, environment_name("octo/forged", 7)) is None


def test_redelivery_changes_nothing(webhook: Process, kubectl: Kubectl) -> None:
    event = pr_event("opened", repo="octo/replay", number=8, sha="3" * 40, updated_at="2026-01-01T00:00:00Z")
    first = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET, delivery="delivery-8")
    assert first.body["result"] == "created"
    name = first.body["name"]
    before = get_pe(kubectl, name)
    assert before is not None
    again = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET, delivery="delivery-8")
    assert (again.status, again.body["result"]) == (202, "ignored")
    # The same event under a new delivery id (another replica's cache would miss it): still nothing.
    other = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET, delivery="delivery-8b")
    assert other.body["result"] == "ignored"
    # What the webhook writes is unchanged (the operator, if running, may be writing its status meanwhile);
    # a write of the redelivery would have put its delivery id on the object.
    after = get_pe(kubectl, name)
    assert after is not None
    assert after["spec"] == before["spec"]
    assert after["metadata"]["annotations"][DELIVERY] == "delivery-8"
    assert after["metadata"]["annotations"][UPDATED_AT] == before["metadata"]["annotations"][UPDATED_AT]


def test_out_of_order_events_never_roll_back(webhook: Process, kubectl: Kubectl, operator: Process) -> None:
    # The operator (its finalizer) must run for the closed environment to go before the reopen.
    repo, number = "octo/order", 9

    def send(action: str, sha: str, at: str) -> str:
        event = pr_event(action, repo=repo, number=number, sha=sha, updated_at=at)
        answer = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET)
        assert answer.status == 202
        result: str = answer.body["result"]
        return result

    name = environment_name(repo, number)
    assert send("opened", "a" * 40, "2026-01-01T00:00:00Z") == "created"
    assert send("synchronize", "c" * 40, "2026-01-01T00:00:30Z") == "updated"
    # A push that GitHub delivers late, after a newer one: ignored.
    assert send("synchronize", "b" * 40, "2026-01-01T00:00:10Z") == "ignored"
    assert get_pe(kubectl, name)["spec"]["commitSha"] == "c" * 40  # type: ignore[index]
    assert send("closed", "c" * 40, "2026-01-01T00:01:00Z") == "deleted"
    # A late push after the close must not resurrect the environment.
    assert send("synchronize", "d" * 40, "2026-01-01T00:00:40Z") == "ignored"
    assert send("opened", "d" * 40, "2026-01-01T00:00:45Z") == "ignored"
    wait_for(lambda: gone(kubectl, name), timeout=30, what="the environment to stay deleted")
    # A real reopen, later than the close, brings it back.
    wait_for(lambda: get_pe(kubectl, name) is None, timeout=60, what="the old object to be gone")
    assert send("reopened", "d" * 40, "2026-01-01T00:02:00Z") == "created"


def test_draft_prs_follow_the_setting(webhook: Process, kubectl: Kubectl) -> None:
    event = pr_event(
        "opened", repo="octo/draft", number=10, sha="4" * 40, updated_at="2026-01-01T00:00:00Z", draft=True
    )
    answer = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET)
    assert answer.body["result"] == "created"  # the default creates drafts like any other PR


BAD_BODIES = [
    (b"", "application/json", 400),
    (b"{not json", "application/json", 400),
    (b"\xff\xfe", "application/json", 400),
    (b"[1, 2, 3]", "application/json", 422),
    (b'"a string"', "application/json", 422),
    (b"{}", "application/json", 422),
    (b"payload=%7Bnot", "application/x-www-form-urlencoded", 400),
    (b"nothing=here", "application/x-www-form-urlencoded", 400),
    (b"<xml/>", "text/xml", 415),
]


@pytest.mark.parametrize(("body", "content_type", "status"), BAD_BODIES)
def test_malformed_bodies_get_a_clear_4xx(
    webhook: Process, kubectl: Kubectl, body: bytes, content_type: str, status: int
) -> None:
    before = all_pe_names(kubectl)
    answer = post_webhook(
        webhook.port, "pull_request", body, secret=WEBHOOK_SECRET, content_type=content_type, raw=True
    )
    assert answer.status == status, answer
    assert set(answer.body) == {"error", "detail"}
    assert created_since(kubectl, before) == set()


def test_body_over_the_limit_is_refused(webhook: Process) -> None:
    big = b"{" + b" " * (10 * 1024 * 1024 + 10) + b"}"
    answer = post_webhook(webhook.port, "pull_request", big, secret=WEBHOOK_SECRET)
    assert answer.status == 413


def test_slow_drip_body_times_out(webhook: Process) -> None:
    with socket.create_connection(("127.0.0.1", webhook.port), timeout=10) as sock:
        sock.sendall(
            b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-GitHub-Event: pull_request\r\nContent-Length: 1000\r\n\r\n{"
        )
        sock.settimeout(10)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408")
    assert http_ok(webhook, "/healthz")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("pull_request", "head", "sha"), 12345),
        (("pull_request", "head", "sha"), "zz" * 20),
        (("pull_request", "number"), "2"),
        (("pull_request", "number"), -1),
        (("repository", "full_name"), "../../kube-system"),
        (("repository", "full_name"), "octo/hello\u202eworld"),
        (("pull_request", "head", "ref"), "feature\x00x"),
        (("pull_request", "head", "ref"), "x" * 300),
        (("pull_request", "user", "login"), "evil\nuser"),
        (("pull_request", "updated_at"), "yesterday"),
        (("installation", "id"), "1"),
    ],
)
def test_wrong_types_and_hostile_strings_are_refused(
    webhook: Process, kubectl: Kubectl, path: tuple[str, ...], value: Any
) -> None:
    event = pr_event("opened", repo="octo/hostile", number=11, sha="5" * 40, updated_at="2026-01-01T00:00:00Z")
    target = event
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    before = all_pe_names(kubectl)
    answer = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET)
    assert answer.status == 422, answer
    assert ".".join(path[-2:]) in answer.body["detail"] or path[-1] in answer.body["detail"]
    assert created_since(kubectl, before) == set()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_BASE = pr_event("opened", repo="octo/fuzz", number=12, sha="6" * 40, updated_at="2026-01-01T00:00:00Z")


def _mutate(path: list[str], value: Any) -> dict[str, Any]:
    event = copy.deepcopy(_BASE)
    target = event
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return event


def _wrong_type(value: Any) -> bool:
    """Neither a string nor an integer: a wrong type for every required field (bool is no int here)."""
    return not isinstance(value, str) and (isinstance(value, bool) or not isinstance(value, int))


_REQUIRED = [
    ["number"],
    ["pull_request", "number"],
    ["pull_request", "head", "sha"],
    ["pull_request", "head", "ref"],
    ["pull_request", "user", "login"],
    ["pull_request", "updated_at"],
    ["repository", "full_name"],
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        _json.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        st.tuples(st.sampled_from(_REQUIRED), _json.filter(_wrong_type)).map(
            lambda pv: json.dumps(_mutate(pv[0], pv[1])).encode()
        ),
    )
)
def test_fuzzed_bodies_get_only_4xx_and_no_object(webhook: Process, kubectl: Kubectl, body: bytes) -> None:
    answer = post_webhook(webhook.port, "pull_request", body, secret=WEBHOOK_SECRET)
    assert 400 <= answer.status < 500, answer
    assert set(answer.body) == {"error", "detail"}
    assert get_pe(kubectl, environment_name("octo/fuzz", 12)) is None


def test_metrics_and_health(webhook: Process) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{webhook.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'ephemera_webhook_events_total{action="opened",event="pull_request",outcome="created"}' in text
    assert "ephemera_webhook_latency_seconds_bucket" in text
    assert http_ok(webhook, "/healthz")
    assert http_ok(webhook, "/readyz")


def test_unreachable_api_server_answers_503(control_plane: ControlPlane, tmp_path: Path) -> None:
    dead = tmp_path / "dead.kubeconfig"
    write_kubeconfig(dead, f"https://127.0.0.1:{free_port()}", control_plane.pki, "admin")
    env = process_env(dead, tmp_path, EPHEMERA_WEBHOOK_SECRET=WEBHOOK_SECRET)
    proc = Process(["webhook"], env, tmp_path / "webhook.log", int(env["EPHEMERA_WEBHOOK_PORT"])).start()
    try:
        wait_for(lambda: http_ok(proc, "/healthz"), timeout=30, what="webhook /healthz")
        event = pr_event("opened", repo="octo/down", number=13, sha="7" * 40, updated_at="2026-01-01T00:00:00Z")
        answer = post_webhook(proc.port, "pull_request", event, secret=WEBHOOK_SECRET)
        assert answer.status == 503
        assert answer.body["error"] == "kubernetes unavailable"
        assert not http_ok(proc, "/readyz")
    finally:
        proc.stop()


def test_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPHEMERA_")}
    env["EPHEMERA_WEBHOOK_PORT"] = str(free_port())
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ephemera.cli", "webhook"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "EPHEMERA_WEBHOOK_SECRET is not set" in result.stderr
    assert time.monotonic() - started < 60
