"""Issue 19 part 2: each lever on the webhook's acknowledgement at concurrency 16, against a bare create,
each measured in the same run (interleaved, ROUNDS times) so the machine's drift hits every variant alike.

Webhook variants (the same `ephemera webhook`, started differently):
  baseline   as shipped: aiohttp on asyncio's loop, the Kubernetes call in a thread pool over urllib3's
             kept-alive connections (pool of 64)
  uvloop     the same under uvloop's event loop
  orjson     the same with json.loads/dumps replaced by orjson's in the process (the webhook parses the
             delivery and the client serialises the create: an upper bound of what orjson could give)
A variant whose package is not installed is skipped: these are measurements, not dependencies.

Floor variants (the bare create of the same PreviewEnvironment, the request path the webhook uses):
  threads           Kube in a thread pool of 16, connections kept alive (the floor of bench/webhook_latency)
  threads, no reuse the same with a pool of one connection: the other 15 threads open a new TLS
                    connection for each request (what the webhook would pay without reuse)
  async             one aiohttp session (kept-alive connections) with the same credentials, no threads: the
                    async client against the thread pool on the same raw request
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import ssl
import subprocess
import sys
import time
from typing import Any

import aiohttp

from bench.harness import SECRET, Stack, report, stack, summary
from bench.webhook_latency import floor_round, webhook_round
from devtools.support import Process, process_env, wait_for
from ephemera.api.naming import environment_name
from ephemera.kube import Kube, load_api_client

CONCURRENCY = 16
COUNT = int(os.environ.get("BENCH_LEVER_COUNT", "800"))
ROUNDS = int(os.environ.get("BENCH_LEVER_ROUNDS", "3"))

# Each runner starts the webhook the way `ephemera webhook` does, after its one change.
RUNNERS = {
    "baseline": None,
    "uvloop": ("uvloop", "import asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())"),
    "orjson": (
        "orjson",
        "import json, orjson; json.loads = orjson.loads; "
        "json.dumps = lambda o, *a, **k: orjson.dumps(o, default=k.get('default')).decode()",
    ),
}


def start(s: Stack, name: str) -> Process:
    environment = process_env(s.plane.kubeconfig, s.tmp, EPHEMERA_LOG_LEVEL="WARNING", EPHEMERA_WEBHOOK_SECRET=SECRET)
    runner = RUNNERS[name]
    proc = Process(["webhook"], environment, s.tmp / f"webhook-{name}.log", int(environment["EPHEMERA_WEBHOOK_PORT"]))
    if runner is None:
        proc.start()
    else:
        _start_with_prelude(proc, runner[1])
    wait_for(lambda: _ready(proc.port), timeout=60, what=f"webhook {name}")
    return proc


def _start_with_prelude(proc: Process, prelude: str) -> None:
    """`ephemera webhook` as Process starts it, with `prelude` run first in the same interpreter."""
    log = proc.log_path.open("ab")
    code = f"{prelude}\nimport sys\nfrom ephemera.cli import main\nsys.exit(main(['webhook']))"
    proc.proc = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, **proc.env}, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def async_floor(kube: Kube, concurrency: int, count: int, repo: str) -> tuple[list[float], float]:
    """The bare create through one aiohttp session with the API client's own credentials."""
    conf = kube.api_client.configuration
    context = ssl.create_default_context(cafile=conf.ssl_ca_cert)
    if conf.cert_file:
        context.load_cert_chain(conf.cert_file, conf.key_file)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token := conf.api_key.get("authorization"):
        headers["Authorization"] = token
    url = f"{conf.host}/apis/ephemera.dev/v1alpha1/previewenvironments"
    latencies: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=context)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(number: int) -> None:
            body = {
                "apiVersion": "ephemera.dev/v1alpha1",
                "kind": "PreviewEnvironment",
                "metadata": {"name": environment_name(repo, number)},
                "spec": {"repository": repo, "pullRequest": number, "commitSha": "a" * 40, "branch": f"f/{number}"},
            }
            async with semaphore:
                started = time.perf_counter()
                async with session.post(url, json=body) as r:
                    await r.read()
                    assert r.status == 201, r.status
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(1, count + 1)))
        return latencies, time.perf_counter() - started


def main() -> None:
    variants = [v for v, r in RUNNERS.items() if r is None or importlib.util.find_spec(r[0]) is not None]
    print(f"webhook variants: {variants}; skipped: {sorted(set(RUNNERS) - set(variants))}", flush=True)
    samples: dict[str, list[float]] = {}
    walls: dict[str, float] = {}
    by_round: dict[str, list[float]] = {}  # each round's p99: does a lever win in every round, or only overall?
    with stack() as s:
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))
        single = Kube(load_api_client(s.plane.kubeconfig, pool_size=1))
        floors: dict[str, Any] = {
            "floor: threads": lambda repo: floor_round(kube, CONCURRENCY, COUNT, repo),
            "floor: threads, no reuse": lambda repo: floor_round(single, CONCURRENCY, COUNT, repo),
            "floor: async": lambda repo: asyncio.run(async_floor(kube, CONCURRENCY, COUNT, repo)),
        }
        hooks = {name: start(s, name) for name in variants}
        for round_ in range(ROUNDS):
            for name, proc in hooks.items():
                repo = f"lever/{name}-{round_}"
                lat, wall = asyncio.run(webhook_round(proc.port, CONCURRENCY, COUNT, repo))
                samples.setdefault(f"webhook: {name}", []).extend(lat)
                by_round.setdefault(f"webhook: {name}", []).append(summary(lat)["p99"] * 1000)
                walls[f"webhook: {name}"] = walls.get(f"webhook: {name}", 0.0) + wall
            for i, (name, run) in enumerate(floors.items()):
                lat, wall = run(f"lever/floor{i}-{round_}")
                samples.setdefault(name, []).extend(lat)
                by_round.setdefault(name, []).append(summary(lat)["p99"] * 1000)
                walls[name] = walls.get(name, 0.0) + wall
            print(f"round {round_ + 1} of {ROUNDS} done, load {os.getloadavg()[0]:.1f}", flush=True)
        for proc in hooks.values():
            proc.stop()
        kube.close()
        single.close()
    base = summary(samples["floor: threads"])
    rows = []
    for name, values in samples.items():
        m = summary(values)
        rows.append(
            {
                "variant": name,
                "requests": len(values),
                "p50_ms": m["p50"] * 1000,
                "p99_ms": m["p99"] * 1000,
                "rps": len(values) / walls[name],
                "p99_vs_floor": m["p99"] / base["p99"],
                "p99_by_round_ms": " ".join(f"{v:.0f}" for v in by_round[name]),
                "load_avg_1m": os.getloadavg()[0],
            }
        )
    report(
        "webhook_levers",
        rows,
        ["variant", "requests", "p50_ms", "p99_ms", "rps", "p99_vs_floor", "p99_by_round_ms", "load_avg_1m"],
    )


if __name__ == "__main__":
    main()
