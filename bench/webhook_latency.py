"""Webhook acknowledgement latency and throughput at concurrency 1, 16 and 64, against the raw API floor.

The floor is a bare create of the same PreviewEnvironment through the API, at the same concurrency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
import uuid

import aiohttp

from bench.harness import pr_event, report, signed, stack, summary
from ephemera.api.naming import environment_name
from ephemera.kube import Kube, load_api_client

COUNTS = {1: 200, 16: 800, 64: 800}


async def webhook_round(port: int, concurrency: int, count: int, repo: str) -> tuple[list[float], float]:
    latencies: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(number: int) -> None:
            body, headers = signed(pr_event("opened", repo, number, "a" * 40, "2026-01-01T00:00:00Z"))
            headers["X-GitHub-Delivery"] = str(uuid.uuid4())
            async with semaphore:
                started = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/webhook", data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 202, r.status
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(1, count + 1)))
        return latencies, time.perf_counter() - started


def floor_round(kube: Kube, concurrency: int, count: int, repo: str) -> tuple[list[float], float]:
    def one(number: int) -> float:
        name = environment_name(repo, number)
        body = {
            "apiVersion": "ephemera.dev/v1alpha1",
            "kind": "PreviewEnvironment",
            "metadata": {"name": name},
            "spec": {"repository": repo, "pullRequest": number, "commitSha": "a" * 40, "branch": f"f/{number}"},
        }
        started = time.perf_counter()
        kube.create_environment(body)
        return time.perf_counter() - started

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(1, count + 1)))
    return latencies, time.perf_counter() - started


def main() -> None:
    rows = []
    with stack() as s:
        webhook = s.start_webhook()
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))
        for concurrency, count in COUNTS.items():
            hook, hook_wall = asyncio.run(webhook_round(webhook.port, concurrency, count, f"bench/hook-c{concurrency}"))
            raw, raw_wall = floor_round(kube, concurrency, count, f"bench/raw-c{concurrency}")
            h, r = summary(hook), summary(raw)
            rows.append(
                {
                    "concurrency": concurrency,
                    "requests": count,
                    "webhook_p50_ms": h["p50"] * 1000,
                    "webhook_p99_ms": h["p99"] * 1000,
                    "webhook_rps": count / hook_wall,
                    "floor_p50_ms": r["p50"] * 1000,
                    "floor_p99_ms": r["p99"] * 1000,
                    "floor_rps": count / raw_wall,
                    "ratio_p50": h["p50"] / r["p50"],
                    "ratio_p99": h["p99"] / r["p99"],
                    "load_avg_1m": os.getloadavg()[0],
                }
            )
        kube.close()
    report("webhook_latency", rows, list(rows[0]))


if __name__ == "__main__":
    main()
