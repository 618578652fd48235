"""What one write costs the API server and etcd (CPU milliseconds), by kind: the floor's plain
creates next to the PreviewEnvironment writes Ephemera makes (create, kopf's patch, status patch),
and the status patch that carries kopf's record too (how a new environment's Ready is written now).
Nothing else runs: no operator, no webhook, no watcher."""

from __future__ import annotations

import concurrent.futures
import json
import sys
from collections.abc import Callable
from typing import Any

from bench.harness import cpu_by_process, report, stack
from ephemera import children
from ephemera.api.models import API_VERSION, KIND, PreviewEnvironmentSpec
from ephemera.api.naming import FINALIZER, environment_labels, environment_name
from ephemera.config import Settings
from ephemera.kube import Kube, load_api_client

REPO = "bench/cost"


def spec(number: int) -> dict[str, Any]:
    return {"repository": REPO, "pullRequest": number, "commitSha": "a" * 40, "branch": f"f/{number}"}


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    settings = Settings()
    rows = []
    with stack() as s:
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=32))
        names = [environment_name(REPO, n) for n in range(1, count + 1)]

        def environment(number: int) -> None:
            name = names[number - 1]
            kube.create_environment(
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "metadata": {
                        "name": name,
                        "labels": environment_labels(name, REPO, number),
                        "annotations": {"ephemera.dev/pr-updated-at": "2026-01-01T00:00:00Z"},
                        "finalizers": [FINALIZER],
                    },
                    "spec": spec(number),
                }
            )

        def kopf_patch(number: int) -> None:  # what kopf writes once a handler is done
            handled = json.dumps({"spec": spec(number), "metadata": {"labels": {}}})
            patch = {"metadata": {"annotations": {"ephemera.dev/last-handled-configuration": handled}}}
            kube.patch_environment(names[number - 1], patch)

        def status(number: int) -> None:
            condition = {
                "type": "Ready",
                "status": "True",
                "reason": "Ready",
                "message": "ready",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
            kube.patch_environment_status(
                names[number - 1], {"phase": "Ready", "message": "ready", "conditions": [condition]}
            )

        def ready_with_record(number: int) -> None:  # both in one status write (kopf's diff-base in status.kopf)
            condition = {
                "type": "Ready",
                "status": "True",
                "reason": "Ready",
                "message": "ready, with kopf's record",
                "lastTransitionTime": "2026-01-01T00:00:01Z",
            }
            handled = json.dumps({"spec": spec(number), "metadata": {"labels": {}}})
            kube.patch_environment_status(
                names[number - 1],
                {
                    "phase": "Ready",
                    "message": "ready, with kopf's record",
                    "conditions": [condition],
                    "kopf": {"last-handled-configuration": handled},
                },
            )

        def namespace(number: int) -> None:
            kube.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": names[number - 1]}})

        def quota(number: int) -> None:
            parsed = PreviewEnvironmentSpec.model_validate(spec(number))
            limits = children.resolve_quota(parsed, settings)
            kube.create_child(children.build_resource_quota(names[number - 1], names[number - 1], parsed, limits))

        steps: list[tuple[str, Callable[[int], None]]] = [
            ("Namespace create (floor)", namespace),
            ("ResourceQuota create (floor)", quota),
            ("PreviewEnvironment create (webhook)", environment),
            ("PreviewEnvironment metadata patch (kopf)", kopf_patch),
            ("PreviewEnvironment status patch (operator)", status),
            ("PreviewEnvironment status patch with kopf's record (one write)", ready_with_record),
        ]
        for what, step in steps:
            before = cpu_by_process(s)
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(step, range(1, count + 1)))
            used = cpu_by_process(s)
            per = {k: 1000 * (used[k] - before[k]) / count for k in ("kube-apiserver", "etcd")}
            rows.append({"write": what, "n": count, "apiserver_ms": per["kube-apiserver"], "etcd_ms": per["etcd"]})
        kube.close()
    report("write_cost", rows, ["write", "n", "apiserver_ms", "etcd_ms"])


if __name__ == "__main__":
    main()
