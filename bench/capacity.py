"""The per-environment costs the capacity model in bench/RESULTS.md is derived from, measured on one shard
of two: what an environment of its own costs the operator's memory, what a namespace of another shard
costs it (every shard watches every namespace), the objects and bytes an environment keeps in etcd, its
API writes from opened to Ready and from closed to gone, and the GitHub requests of one PR's life.
Usage: python -m bench.capacity [environments]."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time
from typing import Any

from bench.harness import Watcher, api_requests, delta, process_usage, report, stack
from bench.shards import send, start
from devtools.support import wait_for
from ephemera.api.naming import MANAGED_BY, MANAGED_BY_LABEL, environment_name, shard_of
from ephemera.kube import Kube, load_api_client

WRITES = ("POST", "PUT", "PATCH", "DELETE")


def settled_rss(pid: int, seconds: float = 20.0) -> float:
    """RSS in MB once the operator has been idle a while (the last of `seconds` of samples)."""
    deadline = time.perf_counter() + seconds
    rss = 0
    while time.perf_counter() < deadline:
        time.sleep(2)
        rss = process_usage(pid)[1]
    return rss / 2**20


def storage_objects(text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("apiserver_storage_objects{"):
            labels, value = line.rsplit(" ", 1)
            resource = labels.split('resource="', 1)[1].split('"', 1)[0]
            counts[resource] = float(value)
    return counts


def main() -> None:
    count = next((int(a) for a in sys.argv[1:] if a.isdigit()), 1000)
    figures: dict[str, Any] = {"environments": count}
    with stack() as s:
        watcher, ns_watcher = Watcher(s.plane), Watcher(s.plane, kind="namespaces")
        webhook, operators = start(s, 2, "capacity")
        shard1 = operators[1]
        assert shard1.proc is not None
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=32))
        base = settled_rss(shard1.proc.pid)

        # Namespaces of another shard: labelled as Ephemera's, which every shard's namespace watch sees.
        def namespace(n: int) -> None:
            body = {"metadata": {"name": f"other-{n}", "labels": {MANAGED_BY_LABEL: MANAGED_BY}}}
            kube.create_namespace({"apiVersion": "v1", "kind": "Namespace", **body})

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            list(pool.map(namespace, range(count)))
        with_namespaces = settled_rss(shard1.proc.pid)
        figures["other shard's namespace: operator RSS per namespace (KB)"] = (with_namespaces - base) * 1024 / count

        # Environments of shard 1's own: opened through the webhook, Ready, then idle.
        repos = [r for r in (f"bench/capacity-r{k}" for k in range(200)) if shard_of(r, 2) == 1][:20]
        prs = [(repos[n % len(repos)], n + 1) for n in range(count)]
        etcd_before = storage_objects(s.kubectl.run("get", "--raw", "/metrics").stdout)
        requests = api_requests(s)
        github_before = len(s.github.calls)
        sent = send(webhook.port, prs, "opened")
        wait_for(lambda: all(n in watcher.ready for n in sent), timeout=1800, interval=0.1, what="Ready")
        time.sleep(10)  # the GitHub reports of the last ones
        opened = delta(api_requests(s), requests)
        own = settled_rss(shard1.proc.pid)
        figures["own environment: operator RSS per environment (KB)"] = (own - with_namespaces) * 1024 / count
        figures["opened -> Ready: API requests per environment"] = {k: round(v / count, 2) for k, v in opened.items()}
        figures["opened -> Ready: API writes per environment"] = round(
            sum(v for k, v in opened.items() if k.split()[0] in WRITES) / count, 2
        )
        etcd_after = storage_objects(s.kubectl.run("get", "--raw", "/metrics").stdout)
        figures["etcd objects per environment"] = {
            k: round((v - etcd_before.get(k, 0.0)) / count, 2)
            for k, v in etcd_after.items()
            if v > etcd_before.get(k, 0)
        }
        sample = environment_name(*prs[0])
        sizes = {
            "previewenvironment": len(json.dumps(kube.get_environment(sample))),
            "namespace": len(json.dumps(kube.get_namespace(sample))),
        }
        for kind in ("resourcequotas", "limitranges", "networkpolicies", "configmaps", "serviceaccounts"):
            group = "networking.k8s.io/v1" if kind == "networkpolicies" else "v1"
            sizes[kind] = sum(len(json.dumps(o)) for o in kube.list_objects(group, kind, sample))
        figures["bytes per environment (JSON as served, by kind)"] = sizes
        requests = api_requests(s)
        sent = send(webhook.port, prs, "closed")
        wait_for(lambda: all(n in ns_watcher.gone for n in sent), timeout=1800, interval=0.1, what="gone")
        time.sleep(10)
        closed = delta(api_requests(s), requests)
        figures["closed -> gone: API writes per environment"] = round(
            sum(v for k, v in closed.items() if k.split()[0] in WRITES) / count, 2
        )
        calls = s.github.calls[github_before:]
        figures["GitHub requests per PR (opened, Ready, closed)"] = round(len(calls) / count, 2)
        kinds: dict[str, int] = {}
        for call in calls:
            key = f"{call.method} {call.path.split('/')[-1] if call.path.count('/') < 3 else call.path.split('/')[4]}"
            kinds[key] = kinds.get(key, 0) + 1
        figures["GitHub requests by kind per PR"] = {k: round(v / count, 2) for k, v in sorted(kinds.items())}
        for proc in [*operators, webhook]:
            proc.stop()
        watcher.stop()
        ns_watcher.stop()
        kube.close()
    print(json.dumps(figures, indent=1))
    rows = [{"figure": k, "value": json.dumps(v) if isinstance(v, dict) else v} for k, v in figures.items()]
    report("capacity", rows, ["figure", "value"])


if __name__ == "__main__":
    main()
