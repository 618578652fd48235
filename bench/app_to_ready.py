"""PR opened -> Ready with an app: the three-object PreviewTemplate (a Deployment of 2, a Service, an
Ingress), one PR at a time and in a burst, through the webhook and the operator with GitHub reporting
to the local server, next to the floor: the same namespace, guards and objects made directly (the
objects by server-side apply into a fresh namespace) and waited on for the same readiness (the
Deployment available at its generation, no older pod left), on the same control plane.

Usage: python -m bench.app_to_ready [burst size] (default 100)."""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import json
import sys
import threading
import time
from typing import Any

from bench.harness import Watcher, stack, summary
from bench.pr_to_ready import floor_then_burst, open_prs, publish
from devtools.controlplane import ControlPlane
from devtools.support import wait_for, web_ingress
from ephemera import children
from ephemera.api.models import PreviewEnvironmentSpec
from ephemera.api.naming import environment_name
from ephemera.config import Settings
from ephemera.kube import Kube, load_api_client
from ephemera.readiness import workload_state

SINGLES = 20
BURST = 100
CONCURRENCY = 32
TEMPLATE_REPOSITORIES = ["bench/app-*"]  # Ephemera's PRs; the floor's namespaces come from bench/floor-*

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "labels": {"app": "web"}},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {
                "containers": [{"name": "web", "image": "shop:{{ commit.short }}", "ports": [{"containerPort": 8080}]}]
            },
        },
    },
}
SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web"},
    "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
}
INGRESS = web_ingress()
PLURALS = {"Deployment": "deployments", "Service": "services", "Ingress": "ingresses"}


def template() -> dict[str, Any]:
    return {
        "apiVersion": "ephemera.dev/v1alpha1",
        "kind": "PreviewTemplate",
        "metadata": {"name": "bench-app"},
        "spec": {
            "repositories": TEMPLATE_REPOSITORIES,
            "url": "https://{{ host }}/",
            "resources": [DEPLOYMENT, SERVICE, INGRESS],
        },
    }


class Available:
    """Watches every Deployment and notes when each namespace's first became ready at its generation
    (the readiness the operator judges: ephemera.readiness.workload_state)."""

    def __init__(self, plane: ControlPlane) -> None:
        from kubernetes import client, watch

        self.at: dict[str, float] = {}
        self._stop = False
        apps = client.AppsV1Api(load_api_client(plane.kubeconfig))

        def run() -> None:
            w = watch.Watch()
            version: str | None = None
            while not self._stop:
                kwargs: dict[str, Any] = {"timeout_seconds": 60}
                if version:
                    kwargs["resource_version"] = version
                try:
                    for event in w.stream(apps.list_deployment_for_all_namespaces, **kwargs):
                        raw = event.get("raw_object") or {}
                        meta = raw.get("metadata") or {}
                        version = meta.get("resourceVersion") or version
                        if event["type"] != "DELETED" and workload_state({**raw, "kind": "Deployment"})[0]:
                            self.at.setdefault(str(meta.get("namespace")), time.perf_counter())
                        if self._stop:
                            w.stop()
                except Exception:
                    version = None

        threading.Thread(target=run, daemon=True).start()

    def stop(self) -> None:
        self._stop = True


def render(obj: dict[str, Any], namespace: str, sha: str) -> dict[str, Any]:
    """The object as the template renders it for this namespace (the two placeholders it uses)."""
    text = (
        json.dumps(obj).replace("{{ commit.short }}", sha[:7]).replace("{{ host }}", f"{namespace}.preview.localhost")
    )
    rendered: dict[str, Any] = json.loads(text)
    rendered["metadata"] = {**rendered["metadata"], "namespace": namespace}
    return rendered


def floor_one(kube: Kube, available: Available, settings: Settings, repo: str, number: int) -> float:
    """Namespace, guards and the three objects made directly; seconds until the Deployment is available."""
    spec = PreviewEnvironmentSpec.model_validate(
        {"repository": repo, "pullRequest": number, "commitSha": "a" * 40, "branch": "f"}
    )
    quota = children.resolve_quota(spec, settings)
    namespace = environment_name(repo, number)
    started = time.perf_counter()
    # As bench/pr_to_ready.py's floor: a plain namespace (no owner, no Ephemera label), the same guards.
    kube.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    kube.create_child(children.build_resource_quota(namespace, namespace, spec, quota))
    kube.create_child(children.build_limit_range(namespace, namespace, spec, quota))
    kube.create_child(children.build_network_policy(namespace, namespace, spec))
    kube.create_child(children.build_egress_policy(namespace, namespace, spec, settings))
    for obj in (SERVICE, DEPLOYMENT, INGRESS):  # the operator's order: Services before workloads
        kube.apply_object(render(copy.deepcopy(obj), namespace, "a" * 40), PLURALS[obj["kind"]], "bench-floor")
    wait_for(lambda: namespace in available.at, timeout=600, interval=0.01, what=f"{namespace} available")
    return available.at[namespace] - started


def floor_burst(kube: Kube, available: Available, settings: Settings, repo: str, count: int) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda n: floor_one(kube, available, settings, repo, n), range(1, count + 1)))
    return time.perf_counter() - started


def main() -> None:
    size = next((int(a) for a in sys.argv[1:] if a.isdigit()), BURST)
    settings = Settings()
    rows: list[dict[str, Any]] = []
    costs: dict[str, object] = {}
    with stack() as s:
        s.kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/previewtemplates.ephemera.dev")
        s.kubectl.apply(template())  # before the operator starts: its cache holds it from the first provision
        s.start_operator()
        s.start_webhook()
        watcher, available = Watcher(s.plane), Available(s.plane)
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))

        floors = [floor_one(kube, available, settings, "bench/floor-single", n) for n in range(1, SINGLES + 1)]
        singles: list[float] = []
        for number in range(1, SINGLES + 1):
            singles += open_prs(s, watcher, "bench/app-single", [number], 1).values()
        one, base = summary(singles), summary(floors)
        rows.append({"case": "1 PR at a time -> app Ready", "n": SINGLES, "p50_s": one["p50"], "p99_s": one["p99"]})
        rows.append(
            {"case": "floor: 1 at a time -> available", "n": SINGLES, "p50_s": base["p50"], "p99_s": base["p99"]}
        )
        rows.append({"case": "p50 over the floor", "n": SINGLES, "p50_s": one["p50"] - base["p50"]})

        measure_floor = functools.partial(floor_burst, kube, available, settings, f"bench/floor-{size}", size)
        case = f"burst of {size} -> all apps Ready"
        rows.append(floor_then_burst(s, watcher, f"bench/app-{size}", size, CONCURRENCY, measure_floor, case, costs))
        watcher.stop()
        available.stop()
        reports = len(s.github.calls)
        kube.close()
    publish("app_to_ready", reports, costs, rows)


if __name__ == "__main__":
    main()
