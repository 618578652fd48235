"""Reliability and security: crashes, outages and hostile input lose nothing and touch nothing.

`make test` runs a short version of each scenario; `make soak` (EPHEMERA_SOAK=1) runs the long one
and prints a summary of what was done and what was lost or leaked.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import itertools
import json
import os
import random
import re
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.fakegithub import FakeGitHub
from devtools.postgres import Postgres
from devtools.support import SOAK, Kubectl, Process, post_webhook, process_env, wait_for
from ephemera.api.models import REPOSITORY_PATTERN
from ephemera.api.naming import MANAGED_BY_LABEL, environment_name
from ephemera.store.engine import make_engine
from ephemera.store.queries import history
from tests.conftest import WEBHOOK_SECRET
from tests.test_github import comments, statuses
from tests.test_operator import make_env, status, wait_phase
from tests.test_webhook import get_pe, pr_event

ENVIRONMENTS = 100 if os.environ.get("EPHEMERA_SOAK") else 24
KILLS = 10 if os.environ.get("EPHEMERA_SOAK") else 3
STORMS = 25 if os.environ.get("EPHEMERA_SOAK") else 4


def all_phases(url: str, names: list[str]) -> dict[str, list[str]]:
    """Each environment's phases as `ephemera environments history` lists them (one query path, no
    process per name: the check runs often, on a loaded machine)."""

    async def read() -> dict[str, list[str]]:
        engine = make_engine(url)
        try:
            found = {name: await history(engine, name) for name in names}
        finally:
            await engine.dispose()
        return {name: [e.to_phase for e in rows[0][1]] if rows else [] for name, rows in found.items()}

    return asyncio.run(read())


def _managed_namespaces(kubectl: Kubectl) -> dict[str, str]:
    """Ephemera's namespaces that are not being deleted, by the name of the object that owns them."""
    items = kubectl.json("get", "namespaces", "-l", f"{MANAGED_BY_LABEL}=ephemera")["items"]
    return {
        ns["metadata"]["ownerReferences"][0]["name"]: ns["metadata"]["name"]
        for ns in items
        if ns["metadata"].get("ownerReferences") and not ns["metadata"].get("deletionTimestamp")
    }


def test_operator_killed_at_random_during_provisions_and_teardowns(
    operator: Process, kubectl: Kubectl, github: FakeGitHub, postgres: Postgres
) -> None:
    rng = random.Random(20261129)
    tag = uuid.uuid4().hex[:4]
    repo = f"octo/crash-{tag}"
    names = [f"crash-{tag}-{i}" for i in range(ENVIRONMENTS)]
    items = [make_env(n, i + 1, repo=repo, installationId=4242) for i, n in enumerate(names)]
    kubectl.apply({"apiVersion": "v1", "kind": "List", "items": items})
    SOAK["events sent"] += len(items)

    def kill_soon() -> None:
        # Kill once a random share of the work is done, at a different point each time.
        target = rng.uniform(0.1, 0.9)
        wait_for(
            lambda: (
                sum(status(kubectl, n).get("phase") == "Ready" for n in rng.sample(names, 6)) / 6 >= target
                or all(status(kubectl, n).get("phase") == "Ready" for n in names[:3])
            ),
            timeout=120,
            interval=0.05,
        )
        operator.restart()
        SOAK["kills"] += 1

    for _ in range(KILLS):
        kill_soon()
    for name in names:
        wait_phase(kubectl, name, "Ready", timeout=180)

    doomed = names[: len(names) // 2]
    kubectl.run("delete", "pe", *doomed, "--wait=false")
    operator.restart()  # mid-teardown
    SOAK["kills"] += 1
    wait_for(lambda: all(get_pe(kubectl, n) is None for n in doomed), timeout=240, what="teardowns")

    survivors = names[len(names) // 2 :]
    for name in survivors:
        assert status(kubectl, name)["phase"] == "Ready"
    owned = {k: v for k, v in _managed_namespaces(kubectl).items() if k in names}
    leaked = set(owned) - set(survivors)
    SOAK["namespaces leaked"] += len(leaked)
    assert not leaked, f"namespaces of deleted environments left behind: {leaked}"
    assert set(owned) == set(survivors)

    # GitHub: one comment per PR, one success status per commit, never more.
    wait_for(
        lambda: all(statuses(github, repo, "a" * 40).count("success") >= 1 for _ in [0]),
        timeout=60,
        what="the reports",
    )
    for number in range(1, ENVIRONMENTS + 1):
        found = comments(github, repo, number)
        assert len(found) <= 1, f"PR {number} got {len(found)} comments"
    assert statuses(github, repo, "a" * 40).count("success") <= ENVIRONMENTS

    # Records: every environment's lifecycle, complete and without duplicates.
    def complete(seen: list[str], gone: bool) -> bool:
        """Every expected transition, in order, none written twice (a repeat would stand next to itself)."""
        want = ["Provisioning", "Ready", "Destroying", "Destroyed"] if gone else ["Provisioning", "Ready"]
        rest = iter(seen)
        in_order = all(any(p == q for q in rest) for p in want)
        return in_order and seen[-1:] == want[-1:] and all(a != b for a, b in itertools.pairwise(seen))

    wrong: dict[str, list[str]] = {}

    def all_complete() -> bool:
        found = all_phases(postgres.url, names)
        wrong.clear()
        wrong.update({n: seen for n, seen in found.items() if not complete(seen, n in doomed)})
        return not wrong

    try:
        wait_for(all_complete, timeout=120, interval=0.5, what="complete records")
    except AssertionError as err:  # say which records are wrong, and how
        raise AssertionError(f"{err}; incomplete, out of order or repeated: {wrong}") from err
    for seen in all_phases(postgres.url, names).values():
        assert seen.count("Destroyed") <= 1
    SOAK["records lost"] += len(wrong)
    SOAK["runs"] += 1


def test_api_server_restart_loses_no_event(
    operator: Process, webhook: Process, control_plane: ControlPlane, kubectl: Kubectl
) -> None:
    repo = f"octo/restart-{uuid.uuid4().hex[:4]}"
    before = pr_event("opened", repo=repo, number=1, sha="1" * 40, updated_at="2026-01-01T00:00:00Z")
    assert post_webhook(webhook.port, "pull_request", before, secret=WEBHOOK_SECRET).status == 202
    control_plane.kill("kube-apiserver", "etcd")
    SOAK["faults injected"] += 1
    try:
        during = pr_event("opened", repo=repo, number=2, sha="2" * 40, updated_at="2026-01-01T00:00:00Z")
        answer = post_webhook(webhook.port, "pull_request", during, secret=WEBHOOK_SECRET, delivery="during-outage")
        # GitHub records the failure and the delivery can be redelivered; nothing was half-done.
        assert answer.status == 503
        assert answer.body["error"] == "kubernetes unavailable"
    finally:
        control_plane.revive("etcd", "kube-apiserver")
    assert get_pe(kubectl, environment_name(repo, 2)) is None
    redelivered = post_webhook(webhook.port, "pull_request", during, secret=WEBHOOK_SECRET, delivery="during-outage")
    assert redelivered.status == 202
    assert redelivered.body["result"] == "created"
    SOAK["events sent"] += 3
    # The operator reconnected on its own: both environments become Ready.
    for number in (1, 2):
        name = environment_name(repo, number)
        wait_for(
            lambda n=name: ((get_pe(kubectl, n) or {}).get("status") or {}).get("phase") == "Ready",  # type: ignore[misc]
            timeout=120,
            what=f"{name} Ready after the restart",
        )


@settings(max_examples=200, deadline=None)
@given(
    repository=st.from_regex(REPOSITORY_PATTERN, fullmatch=True),
    number=st.integers(min_value=1, max_value=2**31),
    prefix=st.sampled_from(["pr", "preview", "p"]),
)
def test_namespace_names_are_always_safe(repository: str, number: int, prefix: str) -> None:
    """Whatever the repository (built to confuse the derivation), the name is DNS-1123, ours, and <= 63."""
    name = environment_name(repository, number, prefix)
    assert len(name) <= 63
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert name.startswith(f"{prefix}-{number}-")
    assert name not in ("default", "kube-system", "kube-public", "kube-node-lease")
    SOAK["bad inputs tried"] += 1


def test_confusable_repositories_get_distinct_namespaces() -> None:
    confusable = [
        ("a-b/c", 1),
        ("a/b-c", 1),
        ("a/b.c", 1),
        ("a/b_c", 1),
        ("A/B-C", 1),
        ("a/b--c", 1),
        ("x" * 39 + "/" + "y" * 100, 1),
        ("x" * 39 + "/" + "y" * 99 + "z", 1),
        ("kube/system", 1),
        ("a/b-c", 11),
    ]
    names = [environment_name(repo, pr) for repo, pr in confusable]
    # Only true equals may share a name: GitHub treats A/B-C and a/b-c as the same repository.
    assert len(set(names)) == len(names) - 1
    assert environment_name("A/B-C", 1) == environment_name("a/b-c", 1)


def test_hostile_objects_touch_nothing_outside_ephemera(operator: Process, kubectl: Kubectl) -> None:
    protected = {
        ns: kubectl.json("get", "namespace", ns)["metadata"]["resourceVersion"] for ns in ("default", "kube-system")
    }
    tag = uuid.uuid4().hex[:4]
    spoofed = environment_name(f"octo/spoof-{tag}", 1)
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": spoofed, "labels": {MANAGED_BY_LABEL: "ephemera"}},
        }
    )
    spoofed_version = kubectl.json("get", "namespace", spoofed)["metadata"]["resourceVersion"]
    hostile = [
        make_env("kube-system", 1, repo=f"kube/system-{tag}"),  # named like a system namespace
        make_env("default", 2, repo=f"kube-system/default-{tag}"),
        make_env(f"spoof-{tag}", 1, repo=f"octo/spoof-{tag}"),  # lands on a namespace with a spoofed label
        make_env(f"greedy-{tag}", 3, repo=f"octo/greedy-{tag}", resources={"memory": "1Ti"}),  # above the ceiling
    ]
    kubectl.apply({"apiVersion": "v1", "kind": "List", "items": hostile})
    SOAK["bad inputs tried"] += len(hostile)
    assert wait_phase(kubectl, "kube-system", "Ready")["namespace"].startswith("pr-1-kube-system-")
    assert wait_phase(kubectl, "default", "Ready")["namespace"].startswith("pr-2-kube-system-default-")
    failed = wait_phase(kubectl, f"spoof-{tag}", "Failed")
    assert "not created by this PreviewEnvironment" in failed["message"]
    greedy = wait_phase(kubectl, f"greedy-{tag}", "Failed")
    assert "above the ceiling" in greedy["message"]
    kubectl.run(
        "delete", "pe", "kube-system", "default", f"spoof-{tag}", f"greedy-{tag}", "--wait=true", "--timeout=90s"
    )
    for ns, version in protected.items():
        assert kubectl.json("get", "namespace", ns)["metadata"]["resourceVersion"] == version
        assert not kubectl.json("-n", ns, "get", "resourcequotas")["items"]
    assert kubectl.json("get", "namespace", spoofed)["metadata"]["resourceVersion"] == spoofed_version
    kubectl.run("delete", "namespace", spoofed, "--wait=false")


@settings(max_examples=STORMS, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_event_storms_end_in_the_state_of_the_last_real_event(
    webhook: Process, kubectl: Kubectl, data: st.DataObject
) -> None:
    """Open, push, close, reopen for one PR, shuffled and duplicated: the last real event wins."""
    repo = f"octo/storm-{uuid.uuid4().hex[:6]}"
    # Only what GitHub can send: pushes and a close while open, a reopen while closed.
    length = data.draw(st.integers(min_value=2, max_value=6), label="length")
    actions, open_ = ["opened"], True
    for _ in range(length):
        choices = ["synchronize", "closed"] if open_ else ["reopened"]
        action = data.draw(st.sampled_from(choices), label="next")
        actions.append(action)
        open_ = action != "closed"
    real: list[dict[str, Any]] = []
    for i, action in enumerate(actions):
        at = f"2026-01-01T00:{i:02d}:00Z"
        real.append(pr_event(action, repo=repo, number=1, sha=f"{i + 1:x}" * 40 if i < 15 else "f" * 40, updated_at=at))
    deliveries = [(str(uuid.uuid4()), event) for event in real]
    storm = deliveries + data.draw(st.lists(st.sampled_from(deliveries), max_size=4), label="duplicates")
    storm = data.draw(st.permutations(storm), label="order")
    for delivery, event in storm:
        answer = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET, delivery=delivery)
        assert answer.status == 202, answer
    SOAK["events sent"] += len(storm)
    # The state the real order would leave: open at the last head, or closed.
    open_ = True
    head = real[0]["pull_request"]["head"]["sha"]
    for event in real:
        if event["action"] == "closed":
            open_ = False
        elif event["action"] == "reopened":
            open_ = True
            head = event["pull_request"]["head"]["sha"]
        elif open_:
            head = event["pull_request"]["head"]["sha"]
    name = environment_name(repo, 1)
    obj = get_pe(kubectl, name)
    alive = obj is not None and not obj["metadata"].get("deletionTimestamp")
    assert alive == open_, json.dumps([(e["action"], e["pull_request"]["updated_at"]) for _, e in storm])
    if open_:
        assert obj is not None
        assert obj["spec"]["commitSha"] == head
    if obj is not None:
        kubectl.run("delete", "pe", name, "--wait=false")


def test_two_replicas_one_active_and_a_standby_takes_over(
    operator: Process, kubectl: Kubectl, control_plane: ControlPlane, tmp_path: Any
) -> None:
    """kopf peering: the higher priority reconciles, the other waits; killing the active hands over."""
    from tests.conftest import db_upgrade, http_ok
    from tests.test_chart import paused

    kubectl.run("apply", "-f", str(REPO_ROOT / "crds" / "clusterkopfpeerings.yaml"))
    kubectl.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "reliability"}})

    def listed(priority: int) -> bool:
        """Whether the replica of `priority` is in the peering object (its keep-alive)."""
        status = kubectl.json("get", "clusterkopfpeering", "reliability").get("status") or {}
        return any(isinstance(peer, dict) and peer.get("priority") == priority for peer in status.values())

    replicas = []
    with paused(operator):
        try:
            for priority in (200, 100):
                env = process_env(
                    control_plane.kubeconfig,
                    tmp_path,
                    EPHEMERA_PEERING="reliability",
                    EPHEMERA_PEERING_PRIORITY=str(priority),
                    EPHEMERA_PEERING_LIFETIME="10",
                )
                db_upgrade(env)
                log = tmp_path / f"operator-{priority}.log"
                replicas.append(Process(["operator"], env, log, int(env["EPHEMERA_OPERATOR_PORT"])).start())
                # kopf starts a replica paused and un-pauses it if its first peering event shows no higher
                # priority; /healthz answers before its peering even starts. The standby is started once the
                # active one's keep-alive is in the peering object, so that its first event shows it: started
                # together, a standby that listed the peering first ran until the active one's entry came.
                wait_for(functools.partial(listed, priority), timeout=60, what=f"the keep-alive of priority {priority}")
            active, standby = replicas
            wait_for(lambda: all(http_ok(p, "/healthz") for p in replicas), timeout=60, what="both replicas")
            first, second = f"peer-{uuid.uuid4().hex[:4]}", f"peer-{uuid.uuid4().hex[:4]}"
            kubectl.apply(make_env(first, 1, repo="octo/peering"))
            wait_phase(kubectl, first, "Ready")
            assert first in active.log()
            assert first not in standby.log()
            active.kill()
            SOAK["kills"] += 1
            kubectl.apply(make_env(second, 2, repo="octo/peering"))
            wait_phase(kubectl, second, "Ready", timeout=90)
            assert second in standby.log()
            kubectl.run("delete", "pe", first, second, "--wait=true", "--timeout=90s")
        finally:
            for proc in replicas:
                proc.stop()


def test_only_the_highest_live_priority_runs_the_operator_wide_jobs() -> None:
    from ephemera.operator.jobs import is_active

    now = datetime.datetime.now(datetime.UTC)
    fresh, stale = now.isoformat(), (now - datetime.timedelta(minutes=5)).isoformat()

    class Peering:
        def __init__(self, status: dict[str, Any]) -> None:
            self.status = status

        def get_peering(self, name: str) -> dict[str, Any]:
            return {"status": self.status}

    peers = Peering(
        {
            "a": {"priority": 200, "lifetime": 60, "lastseen": fresh},
            "b": {"priority": 100, "lifetime": 60, "lastseen": fresh},
        }
    )
    assert is_active(peers, "p", 200, "a")  # type: ignore[arg-type]
    assert not is_active(peers, "p", 100, "b")  # type: ignore[arg-type]
    dead_leader = Peering(
        {
            "a": {"priority": 200, "lifetime": 60, "lastseen": stale},
            "b": {"priority": 100, "lifetime": 60, "lastseen": fresh},
        }
    )
    assert is_active(dead_leader, "p", 100, "b")  # type: ignore[arg-type]
    assert is_active(peers, None, 0, "c")  # type: ignore[arg-type]  # standalone
