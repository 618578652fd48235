"""Operator CPU and memory with 1,000 and 5,000 Ready environments and nothing happening (timers
running), and the webhook's memory under load."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.harness import Watcher, process_usage, report, stack
from bench.webhook_latency import webhook_round
from devtools.support import wait_for
from ephemera.api.naming import environment_name
from ephemera.kube import Kube, load_api_client

IDLE_SECONDS = 60
# At the default intervals (sweep and resync every 300 s) an idle window must hold one of each.
DEFAULT_WINDOW = 330


def create(kube: Kube, start: int, end: int) -> None:
    def one(number: int) -> None:
        repo = "bench/idle"
        kube.create_environment(
            {
                "apiVersion": "ephemera.dev/v1alpha1",
                "kind": "PreviewEnvironment",
                "metadata": {"name": environment_name(repo, number)},
                "spec": {"repository": repo, "pullRequest": number, "commitSha": "a" * 40, "branch": "f"},
            }
        )

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(start, end)))


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [1000, 5000]
    rows: list[dict[str, Any]] = []
    with stack() as s:
        # The sweeps at a short interval, so an idle minute really contains several of them.
        operator = s.start_operator(EPHEMERA_SWEEP_INTERVAL="10", EPHEMERA_RESYNC_INTERVAL="30")
        assert operator.proc is not None
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))
        watcher = Watcher(s.plane)
        made = 0
        for size in sizes:
            started = time.perf_counter()
            create(kube, made + 1, size + 1)
            made = size
            wait_for(lambda n=size: len(watcher.ready) >= n, timeout=1800, interval=0.5, what=f"{size} Ready")  # type: ignore[misc]
            settle = time.perf_counter() - started
            rows.append({"environments": size, "time_to_all_ready_s": settle, **idle(operator.proc.pid, IDLE_SECONDS)})
            rows[-1]["timers"] = "sweep 10 s, resync 30 s"
        # The largest size again, with the operator restarted at its default intervals.
        operator.stop()
        operator = s.start_operator()
        assert operator.proc is not None
        rows.append({"environments": made, **idle(operator.proc.pid, DEFAULT_WINDOW), "timers": "defaults (300 s)"})
        watcher.stop()
        webhook = s.start_webhook()
        assert webhook.proc is not None
        _, before = process_usage(webhook.proc.pid)
        asyncio.run(webhook_round(webhook.port, 16, 2000, "bench/webhook-load"))
        _, after = process_usage(webhook.proc.pid)
        rows.append({"environments": "webhook", "rss_mb": after / 2**20, "rss_max_mb": max(before, after) / 2**20})
        kube.close()
    report(
        "footprint",
        rows,
        ["environments", "timers", "time_to_all_ready_s", "idle_cpu_pct_of_one_core", "rss_mb", "rss_max_mb"],
    )


def idle(
    pid: int, seconds: float, quiet: float = 0.05, on_start: Callable[[], object] | None = None
) -> dict[str, float]:
    """CPU (% of one core) and memory of the process over `seconds` once its start-up work is over (it
    used under `quiet` of a core over 5 s: a traced process never gets as low as an untraced one).
    `on_start` runs as the window begins (a profiler attaching)."""
    wait_for(lambda: _quiet(pid, threshold=quiet), timeout=600, interval=1, what="the operator to go idle")
    if on_start is not None:
        on_start()
    cpu0, _ = process_usage(pid)
    t0 = time.perf_counter()
    rss_max = 0
    while time.perf_counter() - t0 < seconds:
        time.sleep(1)
        rss_max = max(rss_max, process_usage(pid)[1])
    cpu1, rss = process_usage(pid)
    return {
        "idle_cpu_pct_of_one_core": 100 * (cpu1 - cpu0) / (time.perf_counter() - t0),
        "rss_mb": rss / 2**20,
        "rss_max_mb": rss_max / 2**20,
    }


def _quiet(pid: int, window: float = 5.0, threshold: float = 0.05) -> bool:
    """The process used under `threshold` of a core over `window` seconds (the start-up burst is over)."""
    cpu0, _ = process_usage(pid)
    time.sleep(window)
    cpu1, _ = process_usage(pid)
    return (cpu1 - cpu0) / window < threshold


if __name__ == "__main__":
    main()
