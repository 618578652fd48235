"""The webhook against hostile callers and replays: bounded metrics, a real secret, bounded bodies,
closes remembered in the cluster across replicas and restarts, and every owner GitHub allows."""

from __future__ import annotations

import json
import random
import socket
import string
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from devtools.controlplane import ControlPlane
from devtools.support import FIXTURES, Kubectl, Process, post_webhook, process_env, sign, wait_for
from ephemera.api.naming import environment_name
from ephemera.config import Settings
from ephemera.intake.tombstones import COMPONENT, Tombstones, config_map_name
from ephemera.kube import Kube, KubeError
from tests.conftest import WEBHOOK_SECRET, http_ok
from tests.test_webhook import get_pe, gone, pr_event

STATE_NAMESPACE = "ephemera-webhook-state"
DEFAULT_BODY_LIMIT = 327_680  # 320 KiB, the figure the README and the chart quote


def start_webhook(control_plane: ControlPlane, tmp: Path, name: str, **overrides: str) -> Process:
    settings = {"EPHEMERA_WEBHOOK_SECRET": WEBHOOK_SECRET, "EPHEMERA_WEBHOOK_NAMESPACE": STATE_NAMESPACE}
    env = process_env(control_plane.kubeconfig, tmp, **{**settings, **overrides})
    proc = Process(["webhook"], env, tmp / f"{name}.log", int(env["EPHEMERA_WEBHOOK_PORT"])).start()
    wait_for(lambda: http_ok(proc, "/readyz"), timeout=60, what=f"webhook {name} /readyz")
    return proc


@pytest.fixture(scope="module")
def state_namespace(kubectl: Kubectl) -> str:
    if kubectl.run("get", "namespace", STATE_NAMESPACE, check=False).returncode != 0:
        kubectl.run("create", "namespace", STATE_NAMESPACE)
    return STATE_NAMESPACE


@pytest.fixture
def replicas(
    crd: Path, control_plane: ControlPlane, state_namespace: str, tmp_path: Path
) -> Iterator[tuple[Process, Process]]:
    """Two webhook replicas of one installation: the same secret and the same state namespace."""
    first = start_webhook(control_plane, tmp_path, "a")
    try:
        second = start_webhook(control_plane, tmp_path, "b")
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


def metric_series(port: int) -> set[str]:
    """The names and labels of every sample on /metrics, without their values."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def random_word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits + "_-.", k=rng.randint(1, 40)))


# 1. Metrics -------------------------------------------------------------------------------------------


def test_forged_and_unknown_events_do_not_grow_the_metrics(webhook: Process) -> None:
    rng = random.Random(14)
    event = pr_event("opened", repo="octo/metrics", number=1, sha="1" * 40, updated_at="2026-01-01T00:00:00Z")
    # One of each kind first, so that every series the webhook can make for them exists.
    assert post_webhook(webhook.port, "forged", event, secret="not-the-secret").status == 401
    assert post_webhook(webhook.port, "unknown", {}, secret=WEBHOOK_SECRET).status == 202
    assert post_webhook(webhook.port, "pull_request", {**event, "action": "x"}, secret=WEBHOOK_SECRET).status == 202
    before = metric_series(webhook.port)
    for _ in range(1000):
        answer = post_webhook(webhook.port, random_word(rng), event, secret="not-the-secret")
        assert answer.status == 401
    # Signed ones too: GitHub adds events and actions; they must not add series either.
    for _ in range(50):
        assert post_webhook(webhook.port, random_word(rng), {}, secret=WEBHOOK_SECRET).status == 202
        odd = {**event, "action": random_word(rng)}
        assert post_webhook(webhook.port, "pull_request", odd, secret=WEBHOOK_SECRET).status == 202
    after = metric_series(webhook.port)
    assert after == before, sorted(after - before)[:10]
    assert any('event="other"' in s and 'outcome="http_401"' in s for s in after)


# 2. The secret -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [("", "is empty"), ("short-secret", "is 12 bytes"), ("x" * 15, "is 15 bytes")],
    ids=["empty", "12-bytes", "15-bytes"],
)
def test_refuses_to_start_with_an_empty_or_short_secret(
    control_plane: ControlPlane, tmp_path: Path, secret: str, complaint: str
) -> None:
    env = process_env(control_plane.kubeconfig, tmp_path, EPHEMERA_WEBHOOK_SECRET=secret)
    proc = Process(["webhook"], env, tmp_path / "webhook.log", int(env["EPHEMERA_WEBHOOK_PORT"])).start()
    try:
        assert proc.proc is not None
        wait_for(lambda: proc.proc is not None and proc.proc.poll() is not None, timeout=60, what="the webhook to exit")
        assert proc.proc.returncode != 0
        assert f"EPHEMERA_WEBHOOK_SECRET {complaint}" in proc.log()
    finally:
        proc.stop()


def test_an_empty_secret_starts_only_with_the_insecure_flag(
    crd: Path, control_plane: ControlPlane, tmp_path: Path, kubectl: Kubectl
) -> None:
    proc = start_webhook(
        control_plane,
        tmp_path,
        "insecure",
        EPHEMERA_WEBHOOK_SECRET="",
        EPHEMERA_WEBHOOK_INSECURE_NO_SECRET="true",
    )
    try:
        assert "EPHEMERA_WEBHOOK_INSECURE_NO_SECRET is set" in proc.log()
        event = pr_event("opened", repo="octo/insecure", number=1, sha="1" * 40, updated_at="2026-01-01T00:00:00Z")
        assert post_webhook(proc.port, "pull_request", event, secret=None).body["result"] == "created"
    finally:
        proc.stop()
        kubectl.run("delete", "pe", environment_name("octo/insecure", 1), "--wait=false", check=False)


# 3. Bodies ---------------------------------------------------------------------------------------------


def test_the_default_body_limit_is_ten_times_the_largest_pull_request_payload() -> None:
    largest = max(p.stat().st_size for p in (FIXTURES / "payloads" / "pull_request").glob("*.json"))
    assert largest == 31203  # the figure the README and the chart's values quote
    assert Settings.model_fields["webhook_max_body_bytes"].default == DEFAULT_BODY_LIMIT
    assert 10 * largest <= DEFAULT_BODY_LIMIT < 11 * largest


def test_a_signed_body_over_the_default_limit_is_refused(webhook: Process, kubectl: Kubectl) -> None:
    limit = DEFAULT_BODY_LIMIT
    event = pr_event("opened", repo="octo/big", number=1, sha="1" * 40, updated_at="2026-01-01T00:00:00Z")
    event["pull_request"]["body"] = ""
    size = len(json.dumps(event).encode())
    event["pull_request"]["body"] = "x" * (limit + 1 - size)
    answer = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET)
    assert answer.status == 413, answer
    assert get_pe(kubectl, environment_name("octo/big", 1)) is None
    # One byte less is a valid event, and accepted.
    event["pull_request"]["body"] = "x" * (limit - size)
    assert post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET).body["result"] == "created"


def test_a_chunked_body_is_verified_as_it_arrives(webhook: Process) -> None:
    """No Content-Length: the body comes in many chunks, and the signature still covers all of them."""
    event = pr_event("opened", repo="octo/chunked", number=1, sha="1" * 40, updated_at="2026-01-01T00:00:00Z")
    body = json.dumps(event).encode()

    def send(signature: str) -> bytes:
        with socket.create_connection(("127.0.0.1", webhook.port), timeout=30) as sock:
            sock.sendall(
                b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"X-GitHub-Event: pull_request\r\nTransfer-Encoding: chunked\r\n"
                + f"X-Hub-Signature-256: {signature}\r\nConnection: close\r\n\r\n".encode()
            )
            for start in range(0, len(body), 1000):
                piece = body[start : start + 1000]
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
            return sock.recv(4096)

    assert send(sign(WEBHOOK_SECRET, body)).startswith(b"HTTP/1.1 202")
    assert send(sign(WEBHOOK_SECRET, body[:-1])).startswith(b"HTTP/1.1 401")


def test_bodies_in_flight_are_capped(
    crd: Path, control_plane: ControlPlane, state_namespace: str, tmp_path: Path
) -> None:
    proc = start_webhook(
        control_plane, tmp_path, "capped", EPHEMERA_WEBHOOK_MAX_IN_FLIGHT="2", EPHEMERA_WEBHOOK_BODY_TIMEOUT="30"
    )
    stalled: list[socket.socket] = []
    try:
        # Two unauthenticated callers that send a little and then nothing hold both slots.
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", proc.port), timeout=30)
            sock.sendall(
                b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"X-GitHub-Event: pull_request\r\nContent-Length: 100000\r\n\r\n{"
            )
            stalled.append(sock)
        event = pr_event("opened", repo="octo/capped", number=1, sha="1" * 40, updated_at="2026-01-01T00:00:00Z")

        def third() -> Any:
            return post_webhook(proc.port, "pull_request", event, secret=WEBHOOK_SECRET)

        # The stalled requests reach the handler in their own time: wait until both hold a slot.
        busy = wait_for(lambda: (a := third()).status == 503 and a, timeout=30, what="a 503 while two bodies drip")
        assert busy.body["error"] == "busy"
        # Turned away at once, unread and unsigned, with a hint when to come back.
        request = urllib.request.Request(
            f"http://127.0.0.1:{proc.port}/webhook", data=b"{}", headers={"X-GitHub-Event": "ping"}, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503
        assert refused.value.headers["Retry-After"] == "1"
        assert http_ok(proc, "/healthz")
        # The slots come back when the callers go.
        for sock in stalled:
            sock.close()
        stalled.clear()
        wait_for(lambda: third().status == 202, timeout=30, what="the slots to be free again")
        # A caller that hangs up mid-body is refused like any other bad request, without a traceback.
        wait_for(lambda: proc.log().count("incomplete body") == 2, timeout=30, what="both hang-ups logged")
        assert "unexpected error" not in proc.log()
    finally:
        for sock in stalled:
            sock.close()
        proc.stop()


# 4 and 5. Closes remembered in the cluster ---------------------------------------------------------------


def test_a_replayed_opened_never_resurrects_a_closed_pr(
    replicas: tuple[Process, Process], operator: Process, kubectl: Kubectl
) -> None:
    first, second = replicas
    repo, number = f"octo/replay-{uuid.uuid4().hex[:6]}", 3
    name = environment_name(repo, number)
    opened = pr_event("opened", repo=repo, number=number, sha="a" * 40, updated_at="2026-01-01T00:00:00Z")
    closed = pr_event("closed", repo=repo, number=number, sha="a" * 40, updated_at="2026-01-01T00:05:00Z")
    body = json.dumps(opened).encode()
    assert post_webhook(first.port, "pull_request", body, secret=WEBHOOK_SECRET).body["result"] == "created"
    assert post_webhook(first.port, "pull_request", closed, secret=WEBHOOK_SECRET).body["result"] == "deleted"
    wait_for(lambda: get_pe(kubectl, name) is None, timeout=90, what="the closed PR's environment to be gone")

    # A replica that never saw the close refuses the same signed `opened`...
    answer = post_webhook(second.port, "pull_request", body, secret=WEBHOOK_SECRET)
    assert (answer.status, answer.body["result"]) == (202, "ignored"), answer
    assert "closed" in answer.body["reason"]
    # ... and so does the first once restarted (its memory is gone).
    first.restart()
    wait_for(lambda: http_ok(first, "/readyz"), timeout=60, what="the restarted webhook")
    answer = post_webhook(first.port, "pull_request", body, secret=WEBHOOK_SECRET)
    assert (answer.status, answer.body["result"]) == (202, "ignored"), answer
    # A late push is refused the same way; nothing was created at any point.
    late = pr_event("synchronize", repo=repo, number=number, sha="b" * 40, updated_at="2026-01-01T00:04:00Z")
    assert post_webhook(second.port, "pull_request", late, secret=WEBHOOK_SECRET).body["result"] == "ignored"
    assert get_pe(kubectl, name) is None
    # A real reopen, later than the close, still brings it back.
    reopened = pr_event("reopened", repo=repo, number=number, sha="b" * 40, updated_at="2026-01-01T00:06:00Z")
    assert post_webhook(second.port, "pull_request", reopened, secret=WEBHOOK_SECRET).body["result"] == "created"
    closed_again = pr_event("closed", repo=repo, number=number, sha="b" * 40, updated_at="2026-01-01T00:07:00Z")
    assert post_webhook(first.port, "pull_request", closed_again, secret=WEBHOOK_SECRET).body["result"] == "deleted"
    wait_for(lambda: gone(kubectl, name), timeout=30, what="the reopened environment to be torn down")


def test_closes_from_two_replicas_at_once_are_all_remembered(
    replicas: tuple[Process, Process], kubectl: Kubectl
) -> None:
    """Replicas (and each one's threads) write one repository's ConfigMap at once: none is lost."""
    repo, count = f"octo/burst-{uuid.uuid4().hex[:6]}", 40
    ports = [p.port for p in replicas]

    def close(number: int) -> str:
        event = pr_event("closed", repo=repo, number=number, sha="c" * 40, updated_at="2026-01-01T01:00:00Z")
        answer = post_webhook(ports[number % 2], "pull_request", event, secret=WEBHOOK_SECRET)
        assert answer.status == 202, answer
        result: str = answer.body["result"]
        return result

    with ThreadPoolExecutor(max_workers=count) as pool:
        results = list(pool.map(close, range(1, count + 1)))
    assert results == ["ignored"] * count  # no environments: the closes are only remembered
    stored = kubectl.json("-n", STATE_NAMESPACE, "get", "configmap", config_map_name(repo))
    assert sorted(int(pr) for pr in stored["data"]) == list(range(1, count + 1))
    assert stored["metadata"]["labels"]["app.kubernetes.io/component"] == COMPONENT
    for number in range(1, count + 1):
        late = pr_event("opened", repo=repo, number=number, sha="c" * 40, updated_at="2026-01-01T00:59:00Z")
        assert post_webhook(ports[number % 2 - 1], "pull_request", late, secret=WEBHOOK_SECRET).body["result"] == (
            "ignored"
        )
    assert not any(get_pe(kubectl, environment_name(repo, n)) for n in (1, count))


def test_tombstones_keep_the_latest_close_and_prune_after_the_retention(
    kube: Kube, state_namespace: str, kubectl: Kubectl
) -> None:
    now = [time.time()]
    store = Tombstones(kube, namespace=state_namespace, retention=3600, clock=lambda: now[0])
    repo = f"Octo/Prune-{uuid.uuid4().hex[:6]}"
    store.add(repo, 1, "2026-01-01T00:10:00Z")
    store.add(repo, 1, "2026-01-01T00:05:00Z")  # an older close delivered late changes nothing
    assert store.closed_at(repo.lower(), 1) == "2026-01-01T00:10:00Z"  # names are case-insensitive
    assert store.blocks(repo, 1, "2026-01-01T00:10:00Z")
    assert not store.blocks(repo, 1, "2026-01-01T00:10:01Z")
    now[0] += 1800
    store.add(repo, 2, "2026-01-01T00:20:00Z")
    now[0] += 1801  # PR 1 is now past the retention, PR 2 is not
    store.add(repo, 3, "2026-01-01T00:30:00Z")
    data = kubectl.json("-n", state_namespace, "get", "configmap", config_map_name(repo))["data"]
    assert sorted(data) == ["2", "3"]
    assert store.closed_at(repo, 1) is None


def test_tombstones_keep_the_newest_entries_when_full(kube: Kube, state_namespace: str) -> None:
    now = [time.time()]
    store = Tombstones(kube, namespace=state_namespace, retention=3600, clock=lambda: now[0], max_entries=3)
    repo = f"octo/full-{uuid.uuid4().hex[:6]}"
    for number in range(1, 6):
        now[0] += 1
        store.add(repo, number, "2026-01-01T00:00:00Z")
    assert [store.closed_at(repo, n) is not None for n in range(1, 6)] == [False, False, True, True, True]


def test_tombstones_never_overwrite_a_configmap_of_another_repository(
    kube: Kube, state_namespace: str, kubectl: Kubectl
) -> None:
    repo = f"octo/squat-{uuid.uuid4().hex[:6]}"
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": config_map_name(repo), "namespace": state_namespace},
            "data": {"7": "not ours"},
        }
    )
    store = Tombstones(kube, namespace=state_namespace, retention=3600)
    with pytest.raises(KubeError, match="another repository"):
        store.add(repo, 7, "2026-01-01T00:00:00Z")
    assert store.closed_at(repo, 7) is None
    data = kubectl.json("-n", state_namespace, "get", "configmap", config_map_name(repo))["data"]
    assert data == {"7": "not ours"}


# 27. Enterprise Managed Users -------------------------------------------------------------------------


EMU_REPOSITORIES = ["mona-cat_octo/shop", "octo_ent/preview.site_v2", "a_b/x", "Mona-Cat_Octo/" + "r" * 100]


@pytest.mark.parametrize("repository", EMU_REPOSITORIES)
def test_the_api_server_accepts_repositories_of_managed_users(crd: Path, kubectl: Kubectl, repository: str) -> None:
    name = f"emu-{uuid.uuid4().hex[:8]}"
    obj = {
        "apiVersion": "ephemera.dev/v1alpha1",
        "kind": "PreviewEnvironment",
        "metadata": {"name": name},
        "spec": {"repository": repository, "pullRequest": 1, "commitSha": "d" * 40, "branch": "main"},
    }
    result = kubectl.apply(obj, check=False)
    assert result.returncode == 0, result.stderr
    kubectl.run("delete", "pe", name, "--wait=false")


@pytest.mark.parametrize("repository", ["_octo/shop", "octo_/shop", "octo_a_b/shop", "octo_a-b/shop", "octo/sh op"])
def test_owners_github_does_not_allow_are_still_refused(crd: Path, kubectl: Kubectl, repository: str) -> None:
    obj = {
        "apiVersion": "ephemera.dev/v1alpha1",
        "kind": "PreviewEnvironment",
        "metadata": {"name": f"emu-bad-{uuid.uuid4().hex[:8]}"},
        "spec": {"repository": repository, "pullRequest": 1, "commitSha": "d" * 40, "branch": "main"},
    }
    result = kubectl.apply(obj, check=False)
    assert result.returncode != 0
    assert "spec.repository" in result.stderr


def test_the_webhook_creates_an_environment_for_a_managed_users_repository(webhook: Process, kubectl: Kubectl) -> None:
    repo = f"mona-cat_octo/shop-{uuid.uuid4().hex[:4]}"
    event = pr_event("opened", repo=repo, number=4, sha="e" * 40, updated_at="2026-01-01T00:00:00Z")
    answer = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET)
    assert (answer.status, answer.body["result"]) == (202, "created"), answer
    obj = get_pe(kubectl, environment_name(repo, 4))
    assert obj is not None
    assert obj["spec"]["repository"] == repo
