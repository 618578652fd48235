"""PR opened -> Ready (one at a time, bursts of 100 and 500) and PR closed -> namespace gone,
through the webhook and the operator with GitHub reporting to the local server, next to the floor:
a minimal script that makes the same namespaces, quotas, limit ranges and policies directly."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from bench.harness import (
    Stack,
    Watcher,
    api_requests,
    cpu_by_process,
    delta,
    pr_event,
    report,
    signed,
    stack,
    summary,
)
from devtools.support import wait_for
from ephemera import children
from ephemera.api.models import PreviewEnvironmentSpec
from ephemera.api.naming import environment_name
from ephemera.config import Settings
from ephemera.kube import Kube, load_api_client

SINGLES = 30
BURSTS = (100, 500)


def send(port: int, event: dict[str, object]) -> None:
    body, headers = signed(event)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202, response.status


def send_all(s: Stack, action: str, repo: str, numbers: list[int], concurrency: int) -> dict[str, float]:
    """Send `action` for each PR; return when each environment's request was sent."""
    assert s.webhook is not None
    port = s.webhook.port
    at = "2026-01-01T00:00:00Z" if action == "opened" else "2026-01-01T00:10:00Z"
    sent: dict[str, float] = {}

    def one(number: int) -> None:
        sent[environment_name(repo, number)] = time.perf_counter()
        send(port, pr_event(action, repo, number, "a" * 40, at))

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, numbers))
    return sent


def burst(
    s: Stack,
    watcher: Watcher,
    repo: str,
    size: int,
    concurrency: int,
    floor_wall: float,
    case: str,
    costs: dict[str, Any],
) -> dict[str, Any]:
    """Open `size` PRs at once and time them to Ready: the row (against `floor_wall`), and the burst's
    CPU and API requests per environment added to `costs`."""
    cpu, requests = cpu_by_process(s), api_requests(s)
    started = time.perf_counter()
    times = open_prs(s, watcher, repo, list(range(1, size + 1)), concurrency)
    wall = time.perf_counter() - started
    costs[f"burst {size}: CPU seconds"] = delta(cpu_by_process(s), cpu)
    costs[f"burst {size}: API requests per environment"] = {
        k: round(v / size, 2) for k, v in delta(api_requests(s), requests).items()
    }
    b = summary(list(times.values()))
    return {
        "case": case,
        "n": size,
        "p50_s": b["p50"],
        "p99_s": b["p99"],
        "wall_s": wall,
        "floor_wall_s": floor_wall,
        "ratio": wall / floor_wall,
    }


def publish(name: str, github_calls: int, costs: dict[str, object], rows: list[dict[str, Any]]) -> None:
    """Print the costs, then the rows as the table `name` (the columns of both PR -> Ready benchmarks)."""
    print(json.dumps({"github_calls": github_calls, **costs}, indent=1))
    report(name, rows, ["case", "n", "p50_s", "p99_s", "wall_s", "floor_wall_s", "ratio"])


def floor_then_burst(
    s: Stack,
    watcher: Watcher,
    repo: str,
    size: int,
    concurrency: int,
    floor: Callable[[], float],
    case: str,
    costs: dict[str, Any],
) -> dict[str, Any]:
    """The floor first, while Ephemera is idle (after a burst its GitHub reports run on for a while), its
    CPU added to `costs`; then the burst of `size` PRs against the floor's wall time (see `burst`)."""
    cpu = cpu_by_process(s)
    floor_wall = floor()
    costs[f"floor {size}: CPU seconds"] = delta(cpu_by_process(s), cpu)
    return burst(s, watcher, repo, size, concurrency, floor_wall, case, costs)


def open_prs(s: Stack, watcher: Watcher, repo: str, numbers: list[int], concurrency: int) -> dict[str, float]:
    """Seconds from each PR's `opened` request to its environment's Ready."""
    sent = send_all(s, "opened", repo, numbers, concurrency)
    wait_for(lambda: all(n in watcher.ready for n in sent), timeout=900, interval=0.01, what="Ready")
    return {n: watcher.ready[n] - t for n, t in sent.items()}


def close_prs(s: Stack, ns_watcher: Watcher, repo: str, numbers: list[int], concurrency: int) -> dict[str, float]:
    """Seconds from each PR's `closed` request to its namespace being gone."""
    sent = send_all(s, "closed", repo, numbers, concurrency)
    wait_for(lambda: all(n in ns_watcher.gone for n in sent), timeout=1800, interval=0.05, what="namespaces gone")
    return {n: ns_watcher.gone[n] - t for n, t in sent.items()}


def floor(kube: Kube, repo: str, count: int, concurrency: int) -> float:
    """The same Kubernetes writes made directly, with nothing in between."""
    settings = Settings()

    def one(number: int) -> None:
        spec = PreviewEnvironmentSpec.model_validate(
            {"repository": repo, "pullRequest": number, "commitSha": "a" * 40, "branch": "f"}
        )
        quota = children.resolve_quota(spec, settings)
        namespace = environment_name(repo, number)
        # A plain namespace: no owner reference to an object that does not exist (the garbage collector
        # would take it) and no Ephemera label (the operator's sweep would).
        kube.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        kube.create_child(children.build_resource_quota(namespace, namespace, spec, quota))
        kube.create_child(children.build_limit_range(namespace, namespace, spec, quota))
        kube.create_child(children.build_network_policy(namespace, namespace, spec))
        kube.create_child(children.build_egress_policy(namespace, namespace, spec, settings))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(1, count + 1)))
    return time.perf_counter() - started


def floor_teardown(kube: Kube, ns_watcher: Watcher, repo: str, count: int, concurrency: int) -> float:
    """Delete the floor's namespaces directly and wait until they are gone."""
    names = [environment_name(repo, n) for n in range(1, count + 1)]

    def one(name: str) -> None:
        namespace = kube.get_namespace(name)
        if namespace is not None:
            kube.delete_namespace(name, namespace["metadata"]["uid"])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, names))
    wait_for(lambda: all(n in ns_watcher.gone for n in names), timeout=1800, interval=0.05, what="floor teardown")
    return time.perf_counter() - started


def main() -> None:
    args = sys.argv[1:]
    singles_wanted = "--no-singles" not in args
    bursts = tuple(int(a) for a in args if a.isdigit()) or BURSTS
    costs: dict[str, object] = {}
    rows = []
    with stack() as s:
        s.start_operator()
        s.start_webhook()
        watcher, ns_watcher = Watcher(s.plane), Watcher(s.plane, kind="namespaces")
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))

        if singles_wanted:
            singles: list[float] = []
            for number in range(1, SINGLES + 1):
                singles += open_prs(s, watcher, "bench/single", [number], 1).values()
            one = summary(singles)
            rows.append({"case": "1 PR at a time -> Ready", "n": SINGLES, "p50_s": one["p50"], "p99_s": one["p99"]})
            closes = list(close_prs(s, ns_watcher, "bench/single", list(range(1, 11)), 1).values())
            c = summary(closes)
            rows.append({"case": "1 PR closed -> namespace gone", "n": 10, "p50_s": c["p50"], "p99_s": c["p99"]})

        for size in bursts:
            repo = f"bench/burst{size}"
            measure_floor = functools.partial(floor, kube, f"bench/floor{size}", size, 32)
            case = f"burst of {size} -> all Ready"
            rows.append(floor_then_burst(s, watcher, repo, size, 32, measure_floor, case, costs))
            started = time.perf_counter()
            close_prs(s, ns_watcher, repo, list(range(1, size + 1)), 32)
            wall = time.perf_counter() - started
            floor_wall = floor_teardown(kube, ns_watcher, f"bench/floor{size}", size, 32)
            rows.append(
                {
                    "case": f"burst of {size} closed -> namespaces gone",
                    "n": size,
                    "wall_s": wall,
                    "floor_wall_s": floor_wall,
                    "ratio": wall / floor_wall,
                }
            )
        watcher.stop()
        ns_watcher.stop()
        reports = len(s.github.calls)
        kube.close()
    publish("pr_to_ready", reports, costs, rows)


if __name__ == "__main__":
    main()
