"""One operator shard against two on the same burst: PRs spread over many repositories (so that the
shards split them), opened through the webhook at once, timed to Ready; then closed, timed to gone.
Every configuration runs on the same control plane, one after the other (1, 2, 1, 2, ... shards), each
with its own repositories. Usage: python -m bench.shards [burst size] [--rounds R]."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from typing import Any

from bench.harness import (
    SECRET,
    Stack,
    Watcher,
    _http_ok,
    api_requests,
    delta,
    pr_event,
    process_usage,
    report,
    signed,
    stack,
    summary,
)
from devtools.support import Process, process_env, wait_for
from ephemera.api.naming import environment_name, shard_of

REPOSITORIES = 20
CONCURRENCY = 32


def start(s: Stack, shards: int, tag: str) -> tuple[Process, list[Process]]:
    """The webhook and one operator per shard, each shard with its own records file (the records are
    not measured here; a shared SQLite file would only make the shards wait on its lock)."""
    webhook_env = process_env(
        s.plane.kubeconfig,
        s.tmp,
        EPHEMERA_LOG_LEVEL="WARNING",
        EPHEMERA_WEBHOOK_SECRET=SECRET,
        EPHEMERA_SHARDS=str(shards),
    )
    webhook = Process(["webhook"], webhook_env, s.tmp / f"webhook-{tag}.log", int(webhook_env["EPHEMERA_WEBHOOK_PORT"]))
    webhook.start()
    operators = []
    for shard in range(shards):
        directory = s.tmp / f"{tag}-shard-{shard}"
        directory.mkdir()
        env = process_env(
            s.plane.kubeconfig,
            directory,
            EPHEMERA_LOG_LEVEL="WARNING",
            EPHEMERA_GITHUB_API_URL=s.github.url(""),
            EPHEMERA_GITHUB_APP_ID=str(s.github.app_id),
            EPHEMERA_GITHUB_PRIVATE_KEY=s.github.private_key_pem,
            EPHEMERA_SHARDS=str(shards),
            EPHEMERA_SHARD=str(shard),
        )
        command = [sys.executable, "-m", "ephemera.cli", "db", "upgrade"]
        subprocess.run(command, env={**os.environ, **env}, check=True, capture_output=True)
        operators.append(Process(["operator"], env, directory / "operator.log", int(env["EPHEMERA_OPERATOR_PORT"])))
        operators[-1].start()
    wait_for(lambda: _http_ok(webhook, "/readyz"), timeout=60, what="webhook")
    wait_for(lambda: all(_http_ok(p, "/healthz") for p in operators), timeout=90, what="operators")
    return webhook, operators


def balanced(tag: str, shards: int) -> list[str]:
    """REPOSITORIES repositories, as many of each shard (the hash alone split 20 into 16 and 4 in a
    run): the comparison is of shards that share the work evenly."""
    wanted = REPOSITORIES // shards
    found: dict[int, list[str]] = {i: [] for i in range(shards)}
    k = 0
    while any(len(names) < wanted for names in found.values()):
        repository = f"bench/{tag}-r{k}"
        names = found[shard_of(repository, shards)]
        if len(names) < wanted:
            names.append(repository)
        k += 1
    return [repository for names in found.values() for repository in names]


def send(port: int, prs: list[tuple[str, int]], action: str) -> dict[str, float]:
    import urllib.request

    at = "2026-01-01T00:00:00Z" if action == "opened" else "2026-01-01T00:10:00Z"
    sent: dict[str, float] = {}

    def one(pr: tuple[str, int]) -> None:
        repo, number = pr
        body, headers = signed(pr_event(action, repo, number, "a" * 40, at))
        sent[environment_name(repo, number)] = time.perf_counter()
        url = f"http://127.0.0.1:{port}/webhook"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 202, response.status

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, prs))
    return sent


def cpu(processes: list[Process]) -> float:
    return sum(process_usage(p.proc.pid)[0] for p in processes if p.proc is not None)


def plane_cpu(s: Stack) -> dict[str, float]:
    return {name: process_usage(proc.pid)[0] for name, proc in s.plane.processes.items()}


def run(s: Stack, watcher: Watcher, ns_watcher: Watcher, shards: int, size: int, tag: str) -> dict[str, Any]:
    webhook, operators = start(s, shards, tag)
    repos = balanced(tag, shards)
    prs = [(repos[n % REPOSITORIES], n + 1) for n in range(size)]
    split = [sum(1 for repo, _ in prs if shard_of(repo, shards) == i) for i in range(shards)]
    requests, before_cpu, before_plane = api_requests(s), cpu(operators), plane_cpu(s)
    started = time.perf_counter()
    sent = send(webhook.port, prs, "opened")
    wait_for(lambda: all(n in watcher.ready for n in sent), timeout=900, interval=0.01, what="Ready")
    wall = time.perf_counter() - started
    operator_cpu = cpu(operators) - before_cpu
    plane = delta(plane_cpu(s), before_plane)
    per_env = {k: round(v / size, 2) for k, v in delta(api_requests(s), requests).items()}
    to_ready = summary([watcher.ready[n] - t for n, t in sent.items()])
    started = time.perf_counter()
    closed = send(webhook.port, prs, "closed")
    wait_for(lambda: all(n in ns_watcher.gone for n in closed), timeout=1800, interval=0.05, what="gone")
    teardown = time.perf_counter() - started
    for proc in [*operators, webhook]:
        proc.stop()
    print(f"{shards} shard(s), {tag}: API requests per environment {per_env}; control plane CPU {plane}", flush=True)
    return {
        "case": f"{shards} shard(s)",
        "run": tag,
        "n": size,
        "split": "/".join(map(str, split)),
        "wall_s": wall,
        "p50_s": to_ready["p50"],
        "p99_s": to_ready["p99"],
        "operators_cpu_s": operator_cpu,
        "apiserver_cpu_s": plane.get("kube-apiserver", 0.0),
        "etcd_cpu_s": plane.get("etcd", 0.0),
        "teardown_wall_s": teardown,
    }


def main() -> None:
    args = sys.argv[1:]
    size = int(args[0]) if args and args[0].isdigit() else 500
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 2
    rows = []
    with stack() as s:
        watcher, ns_watcher = Watcher(s.plane), Watcher(s.plane, kind="namespaces")
        for round_ in range(rounds):
            for shards in (1, 2):
                rows.append(run(s, watcher, ns_watcher, shards, size, f"s{shards}x{round_}"))
                print(rows[-1], flush=True)
        watcher.stop()
        ns_watcher.stop()
    report(
        "shards",
        rows,
        [
            "case",
            "run",
            "n",
            "split",
            "wall_s",
            "p50_s",
            "p99_s",
            "operators_cpu_s",
            "apiserver_cpu_s",
            "etcd_cpu_s",
            "teardown_wall_s",
        ],
    )


if __name__ == "__main__":
    main()
