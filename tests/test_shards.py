"""Sharded operators on the local control plane: the webhook labels each object with its repository's
shard, each shard's operator handles only its own, a killed shard leaves the others alone while its
standby takes over, and a new shard count moves objects with no provision lost or made twice."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import hashlib
import itertools
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from pydantic import ValidationError

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.postgres import Postgres
from devtools.support import Kubectl, Process, post_webhook, process_env, wait_for
from ephemera import environments as environments_module
from ephemera import shards as shards_service
from ephemera.api.models import Phase
from ephemera.api.naming import RETRY_ANNOTATION, SHARD_LABEL, environment_name, shard_of
from ephemera.cli import read_history
from ephemera.config import Settings
from ephemera.environments import Environment, Environments
from ephemera.expiry import Expiry
from ephemera.kube import Kube
from ephemera.ledger import Ledger, iso, iso_precise
from ephemera.shards import DIFFBASE_ANNOTATION
from ephemera.store.engine import make_engine
from ephemera.store.records import Records
from ephemera.transitions import Transition, Transitions
from tests import test_chart_env as chart_env
from tests import test_idle as idle
from tests.conftest import WEBHOOK_SECRET, db_upgrade, http_ok
from tests.test_chart import paused
from tests.test_operator import make_env
from tests.test_records import _database
from tests.test_reliability import all_phases
from tests.test_webhook import get_pe, pr_event

SHA = "c" * 40
K = TypeVar("K")


def drawn(prefix: str, kind: Callable[[str], K], kinds: Iterable[K], each: int) -> dict[K, list[str]]:
    """`each` repositories `prefix`/repo-N of each of `kinds`, as `kind` tells them apart."""
    found: dict[K, list[str]] = {k: [] for k in kinds}
    for n in itertools.count():
        repository = f"{prefix}/repo-{n}"
        bucket = found[kind(repository)]
        if len(bucket) < each:
            bucket.append(repository)
        if all(len(b) == each for b in found.values()):
            return found
    raise AssertionError("unreachable")


def repositories(shards: int, per_shard: int, tag: str) -> dict[int, list[str]]:
    """`per_shard` repositories of each shard (by the same hash as the webhook's)."""
    return drawn(f"shard-{tag}", lambda repository: shard_of(repository, shards), range(shards), per_shard)


def moving_and_staying(tag: str, each: int) -> list[str]:
    """`each` repositories whose shard changes from 2 to 3 and `each` whose shard stays, alternating (a
    third of all stay: of twelve drawn at random, all moved in about one run in a hundred)."""
    found = drawn(
        f"reshard-{tag}", lambda repository: shard_of(repository, 2) != shard_of(repository, 3), (True, False), each
    )
    return [r for pair in zip(found[True], found[False], strict=True) for r in pair]


def open_pr(webhook: Process, repository: str, number: int = 1) -> str:
    at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = pr_event("opened", repo=repository, number=number, sha=SHA, updated_at=at)
    answer = post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET, delivery=str(uuid.uuid4()))
    assert answer.status == 202, answer
    return environment_name(repository, number)


def provisioned(proc: Process, names: list[str]) -> collections.Counter[str]:
    """How often this operator's provision handler succeeded on each of `names`, by kopf's line about it
    in its log: the cluster holds other tests' objects too, which a shard may handle (shard 0 takes
    every object an unsharded webhook labelled), so a count over all of them proves nothing."""
    found: collections.Counter[str] = collections.Counter()
    for name, record in proc.log_about(names):
        if record.get("message") == "Handler 'provision' succeeded.":
            found[name] += 1
    return found


class Shards:
    """Operators (and a webhook) of one shard count, all against the test's own records database."""

    def __init__(self, control_plane: ControlPlane, tmp: Path, database_url: str) -> None:
        self.control_plane = control_plane
        self.tmp = tmp
        self.database_url = database_url
        self.processes: list[Process] = []

    def operator(self, shard: int, shards: int, name: str, **env: str) -> Process:
        environment = process_env(
            self.control_plane.kubeconfig,
            self.tmp,
            EPHEMERA_DATABASE_URL=self.database_url,
            EPHEMERA_SHARD=str(shard),
            EPHEMERA_SHARDS=str(shards),
            **env,
        )
        db_upgrade(environment)
        proc = Process(["operator"], environment, self.tmp / f"{name}.log", int(environment["EPHEMERA_OPERATOR_PORT"]))
        self.processes.append(proc.start())
        return proc

    def webhook(self, shards: int) -> Process:
        environment = process_env(
            self.control_plane.kubeconfig,
            self.tmp,
            EPHEMERA_WEBHOOK_SECRET=WEBHOOK_SECRET,
            EPHEMERA_SHARDS=str(shards),
        )
        proc = Process(
            ["webhook"], environment, self.tmp / f"webhook-{shards}.log", int(environment["EPHEMERA_WEBHOOK_PORT"])
        )
        self.processes.append(proc.start())
        wait_for(lambda: http_ok(proc, "/readyz"), timeout=60, what="the webhook")
        return proc

    def healthy(self, *procs: Process) -> None:
        wait_for(lambda: all(http_ok(p, "/healthz") for p in procs), timeout=90, what="the operators")

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()


@pytest.fixture
def shards(
    operator: Process, crd: Path, control_plane: ControlPlane, postgres: Postgres, tmp_path: Path
) -> Iterator[Shards]:
    """The session's operator paused, the shards stopped after. Unsharded (EPHEMERA_SHARDS=1), an operator
    handles every object whatever its label, by design: going back to one shard must leave no object
    without an operator (its label may name a shard that no longer runs). So it must not run beside
    the shards; the other modules' objects stay, and the shards own them as they would in a cluster."""
    group = Shards(control_plane, tmp_path, postgres.url)
    with paused(operator):
        try:
            yield group
        finally:
            group.stop()


def label(kubectl: Kubectl, name: str) -> str | None:
    obj = get_pe(kubectl, name)
    return None if obj is None else (obj["metadata"].get("labels") or {}).get(SHARD_LABEL)


def ready(kubectl: Kubectl, names: list[str]) -> bool:
    items = {o["metadata"]["name"]: o for o in kubectl.json("get", "pe")["items"]}
    return all((items.get(n, {}).get("status") or {}).get("phase") == "Ready" for n in names)


def bad_histories(kubectl: Kubectl, url: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """The environments whose recorded history is not exactly one provision, with what explains them:
    their history, the shard label and phase they have now (empty when there is none).

    Records are written off the reconcile path (a queue, one writer task), so an object is Ready before
    its record says so; a shard's writer starts with a resync of every object and row of its shard,
    and in the full suite the cluster holds the other modules' objects, which a shard owns (an
    unsharded webhook labelled them 0; shard 0 hands over those of other shards): the records of
    this test's objects came 20 s and more after Ready there. So wait until each history has its
    Ready (or the deadline passes: the histories then say what is missing), then judge them whole."""
    with contextlib.suppress(AssertionError):
        wait_for(
            lambda: all("Ready" in h for h in all_phases(url, names).values()),
            timeout=120,
            interval=0.5,
            what="every environment's Ready recorded",
        )
    found = {n: h for n, h in all_phases(url, names).items() if h != ["Provisioning", "Ready"]}
    if not found:
        return {}
    items = {o["metadata"]["name"]: o for o in kubectl.json("get", "pe")["items"]}
    return {
        name: {
            "history": history,
            "label": ((items.get(name) or {}).get("metadata") or {}).get("labels", {}).get(SHARD_LABEL),
            "phase": ((items.get(name) or {}).get("status") or {}).get("phase"),
        }
        for name, history in found.items()
    }


def lines_with(log: str, text: str) -> str:
    """The lines of a log that mention `text` (what a failed assertion about a whole log shows)."""
    return "\n".join(line for line in log.splitlines() if text in line)


def delete_all(kubectl: Kubectl, names: list[str]) -> None:
    with contextlib.suppress(Exception):
        kubectl.run("delete", "pe", *names, "--wait=true", "--timeout=120s", check=False)


def test_two_shards_split_the_objects_and_none_is_handled_by_both(shards: Shards, kubectl: Kubectl) -> None:
    webhook = shards.webhook(2)
    zero, one = shards.operator(0, 2, "shard-0"), shards.operator(1, 2, "shard-1")
    shards.healthy(zero, one)
    repos = repositories(2, 4, uuid.uuid4().hex[:6])
    names = {i: [open_pr(webhook, r) for r in repos[i]] for i in (0, 1)}
    everything = names[0] + names[1]
    try:
        assert {label(kubectl, n) for n in names[0]} == {"0"}
        assert {label(kubectl, n) for n in names[1]} == {"1"}
        wait_for(lambda: ready(kubectl, everything), timeout=120, what="every environment Ready")
        # Each shard provisioned its own four once, and no other: by kopf's lines, and by name in its log.
        assert provisioned(zero, everything) == collections.Counter(names[0])
        assert provisioned(one, everything) == collections.Counter(names[1])
        for mine, theirs, proc in ((names[0], names[1], zero), (names[1], names[0], one)):
            log = proc.log()
            assert all(n in log for n in mine)
            assert not any(n in log for n in theirs)
        wrong = bad_histories(kubectl, shards.database_url, everything)
        assert not wrong, f"histories other than Provisioning, Ready: {wrong}"
    finally:
        delete_all(kubectl, everything)


def test_a_killed_shard_leaves_the_others_alone_and_its_standby_takes_over(shards: Shards, kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(REPO_ROOT / "crds" / "clusterkopfpeerings.yaml"))
    for shard in (0, 1):
        name = f"shards-shard-{shard}"
        kubectl.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}})
    webhook = shards.webhook(2)
    peering = {"EPHEMERA_PEERING": "shards", "EPHEMERA_PEERING_LIFETIME": "10"}
    active = shards.operator(0, 2, "shard-0-active", EPHEMERA_PEERING_PRIORITY="200", **peering)
    standby = shards.operator(0, 2, "shard-0-standby", EPHEMERA_PEERING_PRIORITY="100", **peering)
    other = shards.operator(1, 2, "shard-1", EPHEMERA_PEERING_PRIORITY="100", **peering)
    shards.healthy(active, standby, other)
    repos = repositories(2, 3, uuid.uuid4().hex[:6])
    before = {i: [open_pr(webhook, r) for r in repos[i][:2]] for i in (0, 1)}
    everything = before[0] + before[1]
    try:
        wait_for(lambda: ready(kubectl, everything), timeout=120, what="every environment Ready")
        assert all(n in active.log() for n in before[0])
        assert not any(n in standby.log() for n in before[0])
        versions = {n: get_pe(kubectl, n)["metadata"]["resourceVersion"] for n in before[1]}  # type: ignore[index]
        active.kill()
        after = {i: open_pr(webhook, repos[i][2]) for i in (0, 1)}
        everything += list(after.values())
        # The standby takes shard 0 over once the active one's peering entry expires; shard 1 went on.
        wait_for(lambda: ready(kubectl, [after[0], after[1]]), timeout=120, what="the new environments Ready")
        assert after[0] in standby.log()
        assert after[0] not in other.log()
        assert after[1] in other.log()
        assert after[1] not in standby.log()
        assert {n: get_pe(kubectl, n)["metadata"]["resourceVersion"] for n in before[1]} == versions  # type: ignore[index]
    finally:
        delete_all(kubectl, everything)


def test_a_new_shard_count_moves_objects_without_a_lost_or_doubled_provision(shards: Shards, kubectl: Kubectl) -> None:
    webhook = shards.webhook(2)
    first = [shards.operator(i, 2, f"two-{i}") for i in (0, 1)]
    shards.healthy(*first)
    # Some whose shard changes from 2 to 3 and some whose shard stays, among the settled and the late.
    repos = moving_and_staying(uuid.uuid4().hex[:6], 6)
    settled = [open_pr(webhook, r) for r in repos[:8]]
    try:
        wait_for(lambda: ready(kubectl, settled), timeout=120, what="the first environments Ready")
        for proc in first:
            proc.stop()
        second = [shards.operator(i, 3, f"three-{i}") for i in range(3)]
        # Opened while the webhook still labels by two shards: handled where the label says, then moved.
        late = [open_pr(webhook, r) for r in repos[8:]]
        everything = settled + late
        shards.healthy(*second)
        wanted = {environment_name(r, 1): str(shard_of(r, 3)) for r in repos}
        wait_for(
            lambda: ready(kubectl, everything) and all(label(kubectl, n) == wanted[n] for n in everything),
            timeout=180,
            what="every environment Ready under its new shard",
        )
        # The first ones once, by the two shards; nothing moved was provisioned again; the late ones
        # exactly once, each by one shard.
        assert sum((provisioned(p, everything) for p in first), collections.Counter()) == collections.Counter(settled)
        assert sum((provisioned(p, everything) for p in second), collections.Counter()) == collections.Counter(late)
        wrong = bad_histories(kubectl, shards.database_url, everything)
        assert not wrong, f"histories other than Provisioning, Ready: {wrong}"
        namespaces = kubectl.json("get", "namespaces", "-l", "app.kubernetes.io/managed-by=ephemera")["items"]
        mine = [ns for ns in namespaces if ns["metadata"]["name"] in everything]
        assert len(mine) == len(everything)
    finally:
        delete_all(kubectl, settled + [environment_name(r, 1) for r in repos[8:]])


def provisioned_here(kube: Kube, name: str) -> tuple[dict[str, Any], list[Transition]]:
    """Provision the object `name` with the operator's own code, as its create handler does: the status
    kopf's patch would carry (not written), and the transitions announced."""
    live: list[Transition] = []
    transitions = Transitions()
    transitions.subscribe(live.append)
    env = Environment.from_body(kube.get_environment(name) or {})
    status: dict[str, Any] = {}
    Environments(kube, Settings(), transitions).provision(
        env, updating=False, logger=logging.getLogger(__name__), into=status
    )
    return status, live


def applied_on_a_shard(kubectl: Kubectl, prefix: str) -> tuple[str, int]:
    """An object of a repository of its own, labelled with its shard of 3 (never 0: shard 0's label is
    also the unsharded webhook's, on many objects), applied; its name and shard."""
    tag = uuid.uuid4().hex[:6]
    repository = next(r for r in (f"{prefix}-{tag}/repo-{n}" for n in itertools.count()) if shard_of(r, 3))
    shard = shard_of(repository, 3)
    body = make_env(environment_name(repository, 1), 1, repo=repository)
    body["metadata"]["labels"] = {SHARD_LABEL: str(shard)}
    kubectl.apply(body)
    return str(body["metadata"]["name"]), shard


def test_a_handover_records_each_transition_once_whichever_writer_is_first(
    shards: Shards, kube: Kube, kubectl: Kubectl, postgres: Postgres
) -> None:
    """The records race of a reshard, without its timing: an object provisioned by the operator's own
    code against the API server (Provisioning and Ready written with kopf's patch, as the handler
    does), then the writer of the shard that provisioned it (its live transitions) and the writer of
    the shard it moved to (a resync, listing by its label) write to one database, in every order the
    two can interleave. Each time one history: Provisioning, Ready."""
    name, shard = applied_on_a_shard(kubectl, "handover")
    try:
        status, live = provisioned_here(kube, name)
        assert kube.patch_environment_status(name, status) is not None
        assert [t.phase.value for t in live] == ["Provisioning", "Ready"]
        provisioning, ready_ = live
        for order in ([None, provisioning, ready_], [provisioning, None, ready_], [provisioning, ready_, None]):
            url = asyncio.run(_both_writers(postgres, kube, shard, order))
            written = ["resync" if t is None else t.phase.value for t in order]
            assert all_phases(url, [name]) == {name: ["Provisioning", "Ready"]}, f"written in the order {written}"
    finally:
        delete_all(kubectl, [name])


def queued_then_admitted_here(kube: Kube, name: str) -> list[Transition]:
    """Queue the object `name`, then admit and provision it, with the operator's own code and status
    writes: the Queued status the admission writes at a cap, then the admission round's start (its
    queue fields cleared, Provisioning and Ready written). The transitions announced."""
    live: list[Transition] = []
    transitions = Transitions()
    transitions.subscribe(live.append)
    service = Environments(kube, Settings(), transitions)
    env = Environment.from_body(kube.get_environment(name) or {})
    queued_at = iso_precise(datetime.datetime.now(datetime.UTC))
    fields = {"queuePosition": 1, "queuedAt": queued_at, "expiresAt": None}
    service.transition(env, Phase.QUEUED, "EnvironmentLimit", "Queued: 1 live environments in the cluster", fields)
    env = Environment.from_body(kube.get_environment(name) or {})
    admitted = {"queuePosition": None, "queuedAt": None}
    service.provision(env, updating=False, logger=logging.getLogger(__name__), first=admitted)
    return live


def test_a_handover_of_an_environment_admitted_from_the_queue_records_each_transition_once(
    shards: Shards, kube: Kube, kubectl: Kubectl, postgres: Postgres
) -> None:
    """The handover race for a life that began Queued (the lifecycle policy's cap), its object as the
    operator's code leaves it: the new shard's resync (listing by its label) before, between or after
    the old shard's writer's Queued, Provisioning and Ready. Each time one history of the three."""
    name, shard = applied_on_a_shard(kubectl, "queued")
    try:
        live = queued_then_admitted_here(kube, name)
        assert [t.phase.value for t in live] == ["Queued", "Provisioning", "Ready"]
        for n in range(4):
            order: list[Transition | None] = [*live[:n], None, *live[n:]]  # None: the resync
            url = asyncio.run(_both_writers(postgres, kube, shard, order))
            ((_, events),) = asyncio.run(read_history(url, name))
            written = ["resync" if t is None else t.phase.value for t in order]
            assert [(e.from_phase, e.to_phase) for e in events] == [
                (None, "Queued"),
                ("Queued", "Provisioning"),
                ("Provisioning", "Ready"),
            ], f"written in the order {written}"
    finally:
        delete_all(kubectl, [name])


def test_a_first_ready_is_dated_once(
    shards: Shards, kube: Kube, kubectl: Kubectl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status.provisionedAt` is the first Ready's own time: a resync rebuilds that Ready from it once the
    object has moved on (its new shard may list it Updating before the old shard's writer wrote the
    Ready), and the two are one record only if they name the same second. A clock that moves a second
    at every reading makes any second reading of it show."""
    seconds = itertools.count()
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    monkeypatch.setattr(
        environments_module,
        "now_iso",
        lambda: (start + datetime.timedelta(seconds=next(seconds))).isoformat().replace("+00:00", "Z"),
    )
    body = make_env(environment_name(f"dated-{uuid.uuid4().hex[:6]}/repo", 1), 1)
    name = body["metadata"]["name"]
    kubectl.apply(body)
    try:
        status, live = provisioned_here(kube, name)
        (ready,) = [t for t in live if t.phase.value == "Ready"]
        assert status["provisionedAt"] == ready.at == status["conditions"][0]["lastTransitionTime"]
    finally:
        delete_all(kubectl, [name])


async def _both_writers(postgres: Postgres, kube: Kube, shard: int, order: list[Transition | None]) -> str:
    """A database of its own, written by the old shard's writer (the transitions) and the new shard's
    (None: its resync) in `order`; its URL."""
    url = await _database(postgres)
    old, new = Records(make_engine(url)), Records(make_engine(url), kube, shards=3, shard=shard)
    try:
        for item in order:
            if item is None:
                await new._run_resync()
            else:
                await old.write(item)
    finally:
        await old.engine.dispose()
        await new.engine.dispose()
    return url


def test_the_chart_runs_one_operator_per_shard_with_the_environment_it_renders(
    operator: Process,
    control_plane: ControlPlane,
    kubectl: Kubectl,
    postgres: Postgres,
    applied: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """`operator.shards: 2`: two operator Deployments, each with its shard, the count and its own peering
    object, and a webhook that labels for two; run with exactly the rendered environments, under the
    chart's ServiceAccounts and RBAC, each shard makes its own PRs Ready."""
    namespace, release = f"chart-shards-{uuid.uuid4().hex[:6]}", "shardtest"
    secret = "a-webhook-secret-of-32-characters"
    rendered = chart_env.helm(
        control_plane,
        "template", release, str(chart_env.CHART), "--namespace", namespace,
        "--set", "operator.shards=2",
        "--set", "operator.peering=shardtest",
        "--set", f"secrets.webhookSecret={secret}",
        "--set", f"secrets.databaseUrl={postgres.url}",
        "--set", "backstop.enabled=false",
    )  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployments = chart_env.deployment_containers(docs, {})
    fullname = f"{release}-ephemera"
    assert set(deployments) == {f"{fullname}-operator-0", f"{fullname}-operator-1", f"{fullname}-webhook"}
    peerings = {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterKopfPeering"}
    assert peerings == {"shardtest-shard-0", "shardtest-shard-1"}
    operators = [deployments[f"{fullname}-operator-{i}"]["operator"] for i in (0, 1)]
    webhook = deployments[f"{fullname}-webhook"]["webhook"]
    for i, op in enumerate(operators):
        assert (op.env["EPHEMERA_SHARD"], op.env["EPHEMERA_SHARDS"]) == (str(i), "2")
        assert op.env["EPHEMERA_PEERING"] == f"shardtest-shard-{i}"
    assert webhook.env["EPHEMERA_SHARDS"] == "2"

    chart_env.apply_release(kubectl, docs, namespace, applied)
    chart_env.run_init(deployments[f"{fullname}-operator-0"]["db-upgrade"], tmp_path)
    accounts = {
        name: chart_env.token_kubeconfig(control_plane, kubectl, namespace, f"{fullname}-{name}", tmp_path)
        for name in ("operator", "webhook")
    }
    # Both operators render the same port (they run in pods of their own): `running` moves the second.
    pods = [(f"operator-{i}", op, accounts["operator"]) for i, op in enumerate(operators)]
    pods.append(("webhook", webhook, accounts["webhook"]))
    names: list[str] = []
    with paused(operator), chart_env.running(pods, tmp_path) as running:
        try:
            port = running[2].ports()[0]
            repos = repositories(2, 1, uuid.uuid4().hex[:6])
            for shard in (0, 1):
                at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                event = pr_event("opened", repo=repos[shard][0], number=7, sha=SHA, updated_at=at)
                answer = post_webhook(port, "pull_request", event, secret=secret, delivery=str(uuid.uuid4()))
                assert answer.status == 202, answer
                names.append(environment_name(repos[shard][0], 7, operators[0].env["EPHEMERA_NAMESPACE_PREFIX"]))
            wait_for(lambda: ready(kubectl, names), timeout=120, what="both shards' environments Ready")
            logs = [proc.text() for proc in running]
            for shard, name in enumerate(names):
                assert label(kubectl, name) == str(shard)
                assert name in logs[shard], f"{name} is not in {running[shard].log}"
                assert name not in logs[1 - shard], lines_with(logs[1 - shard], name)
                assert "forbidden" not in logs[shard].lower(), lines_with(logs[shard].lower(), "forbidden")
        finally:
            delete_all(kubectl, names)


def _settled_object(**changes: Any) -> dict[str, Any]:
    spec = {"repository": "octo/one", "pullRequest": 1, "commitSha": SHA, "branch": "b"}
    obj: dict[str, Any] = {
        "metadata": {
            "name": "pr-1",
            "generation": 2,
            "resourceVersion": "7",
            "labels": {SHARD_LABEL: "0"},
            "annotations": {DIFFBASE_ANNOTATION: json.dumps({"spec": spec})},
        },
        "spec": spec,
        "status": {"phase": "Ready", "observedGeneration": 2},
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target_dict = obj
        for parent in parents:
            target_dict = target_dict[parent]
        target_dict[leaf] = value
    return obj


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, True),
        ({"metadata__annotations": {"ephemera.dev/provision": "{}"}}, False),  # kopf has a handler under way
        ({"spec": {"repository": "octo/one", "pullRequest": 1, "commitSha": "d" * 40, "branch": "b"}}, False),
        ({"status": {"phase": "Ready", "observedGeneration": 1}}, False),  # a push not yet observed
        ({"status": {"phase": "Provisioning", "observedGeneration": 2}}, False),
        ({"metadata__deletionTimestamp": "2026-01-01T00:00:00Z"}, False),
        ({"status": {"phase": "Failed", "observedGeneration": 2, "permanent": True}}, True),
        # Failed long ago, outside the retry window: nothing will provision it again by itself.
        ({"status": {"phase": "Failed", "observedGeneration": 2, "failedAt": "2000-01-01T00:00:00Z"}}, True),
    ],
)
def test_only_a_settled_object_is_handed_over(changes: dict[str, Any], expected: bool) -> None:
    settings = Settings(shards=2, shard=0)
    assert shards_service.settled(_settled_object(**changes), settings) is expected


def test_a_failed_object_due_a_retry_is_not_settled() -> None:
    settings = Settings(shards=2, shard=0)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    obj = _settled_object(status={"phase": "Failed", "observedGeneration": 2, "failedAt": now, "retries": 0})
    assert not shards_service.settled(obj, settings)
    obj["metadata"]["annotations"][RETRY_ANNOTATION] = "now"
    assert not shards_service.settled(_settled_object(metadata__annotations=obj["metadata"]["annotations"]), settings)


def test_the_shard_of_a_repository_is_stable_and_case_insensitive() -> None:
    # sha256, not Python's salted hash(): every process and release agrees.
    assert [shard_of("octo-org/shop", n) for n in (1, 2, 3, 10)] == [
        0,
        *(int.from_bytes(hashlib.sha256(b"octo-org/shop").digest()[:8], "big") % n for n in (2, 3, 10)),
    ]
    assert shard_of("Octo-Org/Shop", 10) == shard_of("octo-org/shop", 10)


def test_shard_settings_are_checked_and_each_shard_has_its_own_peering() -> None:
    with pytest.raises(ValidationError, match="EPHEMERA_SHARD=2 must be below EPHEMERA_SHARDS=2"):
        Settings(shards=2, shard=2)
    assert Settings(shards=3, shard=1, peering="ephemera").peering == "ephemera-shard-1"
    assert Settings(shards=1, peering="ephemera").peering == "ephemera"


def test_a_shard_queues_admits_and_expires_only_its_own_objects() -> None:
    """A sharded operator's ledger is filled from listings of every shard's objects (the cluster-wide cap
    counts them all) while its watch keeps only its own current: its queue, its provisions in flight and
    its expiry are of its own objects alone, so that no object is admitted or expired by two shards (nor
    by one that does not watch it, and so rewrites its expiresAt from a stale entry every round)."""
    past = iso(idle.START)  # the last activity, an hour before the round below: past a 60 s TTL

    def labelled(obj: dict[str, Any], shard: str) -> dict[str, Any]:
        obj["metadata"]["labels"] = {SHARD_LABEL: shard}
        return obj

    bodies = [
        labelled(idle.body("ready-0", "Ready", "octo/zero", lastActivityAt=past), "0"),
        labelled(idle.body("ready-1", "Ready", "octo/one", lastActivityAt=past), "1"),
        labelled(idle.body("queued-0", "Queued", "octo/zero"), "0"),
        labelled(idle.body("queued-1", "Queued", "octo/one"), "1"),
        labelled(idle.body("provisioning-0", "Provisioning", "octo/zero"), "0"),
    ]
    ledger = Ledger(shard="1")
    ledger.prime(bodies)

    counts = ledger.counts()
    assert counts.live == 3, "the cluster-wide cap counts every shard's live environments"
    assert counts.in_flight == 0, "shard 0's provision is not this shard's in flight"
    assert [entry.name for entry in ledger.queue()] == ["queued-1"]
    expiring, _ = Expiry(None, ledger, lambda _: 60.0).round(idle.START + datetime.timedelta(hours=1))  # type: ignore[arg-type]
    assert [entry.name for entry in expiring] == ["ready-1"]

    unsharded = Ledger()
    unsharded.prime(bodies)
    assert (unsharded.counts().in_flight, len(unsharded.queue())) == (1, 2)
