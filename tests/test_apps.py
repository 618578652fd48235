"""The PR's application in its preview, through the operator on the real control plane: a
PreviewTemplate applied into the namespace, Ready only once its workloads are, pushes rolled out,
removed objects pruned, failures named, and the URL on the object and the PR."""

from __future__ import annotations

import copy
import datetime
import functools
import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.controlplane import ControlPlane
from devtools.fakegithub import FakeGitHub
from devtools.support import Kubectl, Process, post_webhook, wait_for, web_ingress
from ephemera.api.models import parse_time
from ephemera.api.naming import environment_name
from ephemera.config import Settings
from ephemera.environments import Environments
from ephemera.kube import Kube, load_api_client
from ephemera.operator import apps
from ephemera.sweeps import Sweeper
from ephemera.templates import slug
from ephemera.transitions import Transitions
from ephemera.watchcache import Seen
from tests.conftest import WEBHOOK_SECRET
from tests.test_github import INSTALLATION, comments, deployments, statuses
from tests.test_operator import SHA_A, SHA_B, make_env, status, unique, wait_phase
from tests.test_webhook import pr_event

pytestmark = pytest.mark.cluster


@pytest.fixture
def templates(kubectl: Kubectl) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        kubectl.run("delete", "pt", name, "--ignore-not-found")


def put_template(kubectl: Kubectl, made: list[str], name: str, **spec: Any) -> None:
    body = {"apiVersion": "ephemera.dev/v1alpha1", "kind": "PreviewTemplate", "metadata": {"name": name}}
    kubectl.apply({**body, "spec": spec})
    if name not in made:
        made.append(name)


def web(simulate: str | None = None, min_ready: int = 0) -> dict[str, Any]:
    labels = {"app": "web", **({"ephemera.dev/simulate": simulate} if simulate else {})}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "minReadySeconds": min_ready,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "shop:{{ commit.short }}"}]},
            },
        },
    }


SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}
INGRESS = web_ingress()


def condition_time(obj: dict[str, Any], kind: str) -> datetime.datetime | None:
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind and item.get("status") == "True":
            return parse_time(item.get("lastTransitionTime"))
    return None


def test_ready_only_once_the_app_is_available_with_its_url_on_the_pr(
    operator: Process, kubectl: Kubectl, github: FakeGitHub, templates: list[str]
) -> None:
    repo = f"octo/app-{uuid.uuid4().hex[:6]}"
    put_template(
        kubectl,
        templates,
        unique("shop"),
        repositories=[repo],
        url="https://{{ host }}/",
        resources=[web(min_ready=3), SERVICE, INGRESS],
    )
    name = unique("app")
    kubectl.apply(make_env(name, 7, repo=repo, installationId=INSTALLATION))
    rolling = wait_phase(kubectl, name, "Provisioning")
    wait_for(lambda: status(kubectl, name).get("reason") in ("RollingOut", "Ready"), timeout=60, what="rollout")
    ready = wait_phase(kubectl, name, "Ready", timeout=120)
    namespace = ready["namespace"]
    deployment = kubectl.json("get", "deployment", "-n", namespace, "web")
    available = condition_time(deployment, "Available")
    assert available is not None
    # Ready came no earlier than the Deployment's availability (minReadySeconds holds it back).
    became_ready = parse_time(ready["lastTransitionTime"])
    assert became_ready is not None
    assert became_ready >= available.replace(microsecond=0)
    assert rolling  # it was seen before Ready
    url = f"https://{namespace}.preview.localhost/"
    assert ready["url"] == url
    assert {(i["kind"], i["name"]) for i in ready["inventory"]} == {
        ("Deployment", "web"),
        ("Service", "web"),
        ("Ingress", "web"),
    }
    assert kubectl.json("get", "ingress", "-n", namespace, "web")["spec"]["rules"][0]["host"] == url[8:-1]
    # The URL on the PR: the commit status's target, the comment's link, the Deployment's environment_url.
    wait_for(lambda: statuses(github, repo, SHA_A)[-1:] == ["success"], timeout=60, what="a success status")
    target = github.statuses[f"{repo}@{SHA_A}"][-1]
    assert target["target_url"] == url
    wait_for(
        lambda: any(url in c["body"] for c in comments(github, repo, 7)), timeout=60, what="the URL in the comment"
    )
    (gh_deployment,) = deployments(github, repo)
    wait_for(
        lambda: any(s.get("environment_url") == url for s in github.deployment_statuses[gh_deployment["id"]]),
        timeout=60,
        what="the GitHub Deployment's environment_url",
    )


def test_a_push_rolls_out_the_new_image_and_prunes_what_the_template_dropped(
    operator: Process, kubectl: Kubectl, templates: list[str]
) -> None:
    repo = f"octo/push-{uuid.uuid4().hex[:6]}"
    template = unique("push")
    put_template(kubectl, templates, template, repositories=[repo], resources=[web(), SERVICE])
    name = unique("push")
    kubectl.apply(make_env(name, 8, repo=repo))
    namespace = wait_phase(kubectl, name, "Ready", timeout=120)["namespace"]
    assert kubectl.json("get", "service", "-n", namespace, "web")

    put_template(kubectl, templates, template, repositories=[repo], resources=[web()])  # the Service is dropped
    kubectl.run("patch", "pe", name, "--type=merge", "-p", f'{{"spec": {{"commitSha": "{SHA_B}"}}}}')
    wait_for(lambda: status(kubectl, name).get("commit") == SHA_B[:7], timeout=120, what="the new commit")
    ready = wait_phase(kubectl, name, "Ready", timeout=120)
    sets = kubectl.json("get", "replicasets", "-n", namespace)["items"]
    by_image = {rs["spec"]["template"]["spec"]["containers"][0]["image"]: rs for rs in sets}
    assert by_image[f"shop:{SHA_A[:7]}"]["status"].get("replicas", 0) == 0  # the old one emptied before Ready
    assert by_image[f"shop:{SHA_B[:7]}"]["status"].get("readyReplicas") == 2
    assert [i["kind"] for i in ready["inventory"]] == ["Deployment"]
    wait_for(
        lambda: kubectl.run("get", "service", "-n", namespace, "web", check=False).returncode != 0,
        timeout=30,
        what="the dropped Service pruned",
    )


def test_a_crash_loop_fails_naming_the_container_and_a_fixed_template_recovers(
    operator: Process, kubectl: Kubectl, templates: list[str]
) -> None:
    repo = f"octo/crash-{uuid.uuid4().hex[:6]}"
    template = unique("crash")
    put_template(kubectl, templates, template, repositories=[repo], resources=[web(simulate="crash-loop")])
    name = unique("crash")
    kubectl.apply(make_env(name, 9, repo=repo))
    failed = wait_phase(kubectl, name, "Failed", timeout=120)
    assert failed["reason"] == "RolloutFailed"
    assert "CrashLoopBackOff" in failed["message"]
    assert "container web" in failed["message"]

    put_template(kubectl, templates, template, repositories=[repo], resources=[web()])
    kubectl.run("annotate", "pe", name, f"ephemera.dev/retry={uuid.uuid4().hex[:6]}", "--overwrite")
    wait_phase(kubectl, name, "Ready", timeout=120)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "grab"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "default"}],
            },
            "ClusterRoleBinding is not allowed",
        ),
        (
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "kube-system"}},
            "names namespace kube-system",
        ),
    ],
)
def test_a_template_reaching_outside_the_namespace_is_refused_and_applies_nothing(
    operator: Process, kubectl: Kubectl, templates: list[str], bad: dict[str, Any], message: str
) -> None:
    repo = f"octo/bad-{uuid.uuid4().hex[:6]}"
    put_template(kubectl, templates, unique("bad"), repositories=[repo], resources=[web(), copy.deepcopy(bad)])
    name = unique("bad")
    kubectl.apply(make_env(name, 10, repo=repo))
    failed = wait_phase(kubectl, name, "Failed", timeout=90)
    assert message in failed["message"]
    assert failed.get("permanent") is True
    namespace = failed.get("namespace") or kubectl.json("get", "pe", name)["status"].get("namespace")
    if namespace:
        assert kubectl.json("get", "deployments", "-n", namespace)["items"] == []
    assert kubectl.run("get", "clusterrolebinding", "grab", check=False).returncode != 0
    assert kubectl.run("get", "configmap", "-n", "kube-system", "x", check=False).returncode != 0


def test_the_prs_title_from_the_webhook_reaches_the_template_as_a_value_only(
    operator: Process, webhook: Process, kubectl: Kubectl, templates: list[str]
) -> None:
    repo = f"octo/title-{uuid.uuid4().hex[:6]}"
    info = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "info"},
        "data": {"title": "{{ pr.title }}", "branch": "{{ branch_slug }}"},
    }
    put_template(kubectl, templates, unique("title"), repositories=[repo], resources=[info])
    title = "Fix: cart\tnamespace: kube-system"  # a control character, and YAML that must stay text
    event = pr_event("opened", repo=repo, number=11, sha=SHA_A, updated_at="2026-02-01T00:00:00Z", title=title)
    event["installation"]["id"] = INSTALLATION
    assert post_webhook(webhook.port, "pull_request", event, secret=WEBHOOK_SECRET).status == 202
    name = environment_name(repo, 11)
    ready = wait_phase(kubectl, name, "Ready", timeout=120)
    assert kubectl.json("get", "pe", name)["spec"]["title"] == "Fix: cart namespace: kube-system"
    data = kubectl.json("get", "configmap", "-n", ready["namespace"], "info")["data"]
    assert data["title"] == "Fix: cart namespace: kube-system"
    assert data["branch"] == slug(event["pull_request"]["head"]["ref"])


def test_a_long_rollout_is_timed_by_its_template_not_the_stale_sweep(
    operator: Process, kubectl: Kubectl, control_plane: ControlPlane, templates: list[str]
) -> None:
    repo = f"octo/slow-{uuid.uuid4().hex[:6]}"
    slow = web(min_ready=3600)  # available only after an hour: the rollout waits
    slow["spec"]["progressDeadlineSeconds"] = 7200
    put_template(
        kubectl, templates, unique("slow"), repositories=[repo], resources=[slow], readiness={"timeoutSeconds": 7200}
    )
    name = unique("slow")
    kubectl.apply(make_env(name, 12, repo=repo))
    wait_for(lambda: status(kubectl, name).get("reason") == "RollingOut", timeout=90, what="the rollout waiting")

    def older_than_a_second() -> bool:
        since = parse_time(status(kubectl, name).get("lastTransitionTime"))
        return since is not None and (datetime.datetime.now(datetime.UTC) - since).total_seconds() > 1.5

    wait_for(older_than_a_second, timeout=30, what="the rollout older than the stale threshold")
    kube = Kube(load_api_client(control_plane.kubeconfig))
    try:
        sweeper = Sweeper(
            Environments(kube, Settings(stale_threshold=1), Transitions()), selector="ephemera.dev/none=1"
        )
        uid = kubectl.json("get", "pe", name)["metadata"]["uid"]
        since = status(kubectl, name)["lastTransitionTime"]
        for reason in ("RollingOut", None):  # as the watch saw it, or before it saw the reason
            seen = {name: Seen(uid=uid, phase="Provisioning", since=since, deleted_at=None, reason=reason)}
            assert sweeper.sweep(seen).stale == 0
    finally:
        kube.close()
    after = status(kubectl, name)
    assert (after["phase"], after["reason"]) == ("Provisioning", "RollingOut")
    assert after["rolloutDeadline"]
    kubectl.run("delete", "pe", name, "--wait=false")


def reprovisions(kubectl: Kubectl, name: str) -> list[datetime.datetime]:
    """When the operator began re-applying an edited template to `name` (its TemplateChanged Events)."""
    events = kubectl.json(
        "get", "events", "-n", "default", "--field-selector", f"involvedObject.name={name},reason=TemplateChanged"
    )["items"]
    return sorted(t for e in events if (t := parse_time(e.get("firstTimestamp"))) is not None)


def rollout_starts(operator: Process, names: list[str]) -> dict[str, datetime.datetime]:
    """When the operator's template rollout started on each of `names` (its log line), each once."""
    found: dict[str, datetime.datetime] = {}
    for name, record in operator.log_about(names):
        if record.get("message") == f"re-provisioning {name} for its PreviewTemplate":
            assert name not in found, f"{name} started twice"
            found[name] = datetime.datetime.fromisoformat(record["time"])
    return found


def ready_at(kubectl: Kubectl, name: str, generation: int) -> dict[str, Any] | None:
    """The status of `name` once it is Ready with the app of the template's `generation`."""
    found = status(kubectl, name)
    ready = found.get("phase") == "Ready" and (found.get("template") or {}).get("generation") == generation
    return found if ready else None


def gone(kubectl: Kubectl, namespace: str, kind: str, name: str) -> bool:
    return kubectl.run("get", kind, "-n", namespace, name, check=False).returncode != 0


def image_of(kubectl: Kubectl, namespace: str) -> str:
    deployment = kubectl.json("get", "deployment", "-n", namespace, "web")
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def test_an_edited_template_rolls_out_to_its_environments_at_a_bounded_rate(
    operator: Process, kubectl: Kubectl, templates: list[str]
) -> None:
    repo, other_repo = f"octo/roll-{uuid.uuid4().hex[:6]}", f"octo/keep-{uuid.uuid4().hex[:6]}"
    template = unique("roll")
    put_template(kubectl, templates, template, repositories=[repo], resources=[web(), SERVICE])
    put_template(kubectl, templates, unique("keep"), repositories=[other_repo], resources=[web()])
    names = [unique("roll") for _ in range(3)]
    for number, name in enumerate(names, start=31):
        kubectl.apply(make_env(name, number, repo=repo))
    other = unique("keep")
    kubectl.apply(make_env(other, 39, repo=other_repo))
    namespaces = {name: wait_phase(kubectl, name, "Ready", timeout=120)["namespace"] for name in [*names, other]}
    before = kubectl.json("get", "pe", other)
    other_generation = kubectl.json("get", "deployment", "-n", namespaces[other], "web")["metadata"]["generation"]

    edited = web()
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "shop-next:{{ commit.short }}"
    put_template(kubectl, templates, template, repositories=[repo], resources=[edited, SERVICE])
    generation = kubectl.json("get", "pt", template)["metadata"]["generation"]
    assert generation == 2
    for name in names:
        ready = wait_for(
            functools.partial(ready_at, kubectl, name, generation),
            timeout=120,
            what=f"{name} Ready at the template's generation {generation}",
        )
        assert image_of(kubectl, ready["namespace"]) == f"shop-next:{SHA_A[:7]}"
        sets = kubectl.json("get", "replicasets", "-n", ready["namespace"])["items"]
        by_image = {rs["spec"]["template"]["spec"]["containers"][0]["image"]: rs for rs in sets}
        assert by_image[f"shop:{SHA_A[:7]}"]["status"].get("replicas", 0) == 0  # the old pods went before Ready
        assert by_image[f"shop-next:{SHA_A[:7]}"]["status"].get("readyReplicas") == 2

    # Each re-applied once (one TemplateChanged Event each), and started one a second at most
    # (EPHEMERA_TEMPLATE_ROLLOUT_RATE=1), by the operator's line at each start: an Event's time is its
    # environment's own, a read and a status write after its start, in whole seconds (two starts a
    # second apart, the first one's writes slower, shared one).
    for name in names:
        assert len(wait_for(functools.partial(reprovisions, kubectl, name), timeout=30)) == 1, name
    starts = rollout_starts(operator, names)
    assert sorted(starts) == sorted(names), starts
    times = sorted(starts.values())
    assert all((later - earlier).total_seconds() >= 0.99 for earlier, later in itertools.pairwise(times)), times

    # Another repository's environment and app are untouched.
    after = kubectl.json("get", "pe", other)
    assert after["status"]["lastTransitionTime"] == before["status"]["lastTransitionTime"]
    assert after["status"]["template"] == before["status"]["template"]
    assert reprovisions(kubectl, other) == []
    deployment = kubectl.json("get", "deployment", "-n", namespaces[other], "web")
    assert deployment["metadata"]["generation"] == other_generation


def test_an_environment_its_template_no_longer_matches_has_its_app_pruned(
    operator: Process, kubectl: Kubectl, templates: list[str]
) -> None:
    repo = f"octo/narrow-{uuid.uuid4().hex[:6]}"
    template = unique("narrow")
    put_template(kubectl, templates, template, repositories=[repo], resources=[web(), SERVICE])
    name = unique("narrow")
    kubectl.apply(make_env(name, 41, repo=repo))
    namespace = wait_phase(kubectl, name, "Ready", timeout=120)["namespace"]
    assert kubectl.json("get", "deployment", "-n", namespace, "web")

    put_template(kubectl, templates, template, repositories=[f"{repo}-elsewhere"], resources=[web(), SERVICE])
    wait_for(lambda: not status(kubectl, name).get("inventory"), timeout=60, what="the inventory emptied")
    ready = wait_phase(kubectl, name, "Ready", timeout=60)
    assert not ready.get("template")
    for kind in ("deployment", "service"):
        wait_for(
            functools.partial(gone, kubectl, namespace, kind, "web"),
            timeout=30,
            what=f"the {kind} pruned",
        )


def test_a_fixed_template_brings_a_failed_environment_back_without_a_retry(
    operator: Process, kubectl: Kubectl, templates: list[str]
) -> None:
    repo = f"octo/fix-{uuid.uuid4().hex[:6]}"
    template = unique("fix")
    put_template(kubectl, templates, template, repositories=[repo], resources=[web(simulate="image-pull")])
    name = unique("fix")
    kubectl.apply(make_env(name, 42, repo=repo))
    assert wait_phase(kubectl, name, "Failed", timeout=120)["permanent"] is True

    put_template(kubectl, templates, template, repositories=[repo], resources=[web()])
    ready = wait_phase(kubectl, name, "Ready", timeout=120)
    assert ready["template"]["generation"] == 2


def test_a_rollout_is_checked_once_its_status_lands(control_plane: ControlPlane) -> None:
    """Workloads that became ready between the operator's own check and its RollingOut status landing
    sent their events while the watch did not show the environment waiting: the status's own event
    must bring the check, or Ready waits for the periodic deadline check (10 s)."""
    kube = Kube(load_api_client(control_plane.kubeconfig))
    try:
        settler = apps.Settler(Environments(kube, Settings(), Transitions()))
        rolling = {"metadata": {"name": "env-a"}, "status": {"phase": "Provisioning", "reason": "RollingOut"}}
        assert apps.rolling_out(rolling)
        apps.rollout_landed(settler, "env-a")
        assert settler.due == {"env-a"}
        deleting = {"metadata": {"name": "b", "deletionTimestamp": "2026-01-01T00:00:00Z"}, "status": rolling["status"]}
        assert not apps.rolling_out(deleting)
        assert not apps.rolling_out({"metadata": {"name": "c"}, "status": {"phase": "Ready", "reason": "Ready"}})
    finally:
        kube.close()


def test_a_workload_ready_at_its_generation_is_checked_without_the_gathering_delay() -> None:
    deployment = web()
    deployment["metadata"]["generation"] = 2
    deployment["status"] = {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
    assert apps.ready_now(deployment)
    assert not apps.ready_now({**deployment, "status": {**deployment["status"], "observedGeneration": 1}})
    assert not apps.ready_now({**deployment, "status": {**deployment["status"], "availableReplicas": 1}})
    assert not apps.ready_now({"kind": "Service", "metadata": {"name": "web"}})
