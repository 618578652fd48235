"""Issue 19 part 2: each lever on the webhook's acknowledgement at concurrency 16, against a bare create,
each measured in the same run (interleaved, ROUNDS times) so the machine's drift hits every variant alike.

Webhook variants (the same `ephemera webhook`, started differently):
  baseline   as shipped: aiohttp on asyncio's loop, the Kubernetes call in a thread pool over urllib3's
             kept-alive connections (pool of 64), the intake's guards answered from its mirrors
  uvloop     the same under uvloop's event loop
  orjson     the same with json.loads/dumps replaced by orjson's in the process (the webhook parses the
             delivery and the client serialises the create: an upper bound of what orjson could give)
  spans      as shipped, with timing spans per request (bench/webhook_spans.py): where the time goes
  noreads    an upper bound, not a variant to ship: the intake's reads before a new PR's create skipped
  nomirror   the intake's reads made per event, not answered from its watched mirrors
  before     the webhook of the checkout BENCH_LEVER_BEFORE (a change's before, in the same run)
A variant whose package is not installed is skipped: these are measurements, not dependencies.
BENCH_LEVER_VARIANTS (comma-separated) picks variants; the floor `threads`, which every ratio is taken
against, always runs. Each round runs every variant once, starting with a different one each round.

Floor variants (the bare create of the same PreviewEnvironment, the request path the webhook uses):
  threads           Kube in a thread pool of 16, connections kept alive (the floor of bench/webhook_latency)
  threads, no reuse the same with a pool of one connection: the other 15 threads open a new TLS
                    connection for each request (what the webhook would pay without reuse)
  async             one aiohttp session (kept-alive connections) with the same credentials, no threads: the
                    async client against the thread pool on the same raw request
  same object       `threads` creating the very object the webhook creates for the event (its labels,
                    annotations, finalizer and author), where the others create a minimal one
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import ssl
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import SECRET, Stack, pr_event, report, stack, summary
from bench.webhook_latency import floor_round, webhook_round
from bench.webhook_spans import breakdown
from devtools.support import Process, process_env, wait_for
from ephemera.api.naming import environment_name
from ephemera.intake.events import parse_pull_request
from ephemera.intake.pullrequests import Intake, Policies
from ephemera.intake.tombstones import Tombstones
from ephemera.kube import Kube, load_api_client
from ephemera.policy import Policy

CONCURRENCY = int(os.environ.get("BENCH_LEVER_CONCURRENCY", "16"))
COUNT = int(os.environ.get("BENCH_LEVER_COUNT", "800"))
ROUNDS = int(os.environ.get("BENCH_LEVER_ROUNDS", "3"))
# A checkout (e.g. `git archive main | tar -x -C DIR`) whose webhook runs as the variant `before`: a
# change's before and after measured in one run.
BEFORE = os.environ.get("BENCH_LEVER_BEFORE", "")

# Each runner starts the webhook the way `ephemera webhook` does, after its one change.
RUNNERS = {
    "baseline": None,
    "uvloop": ("uvloop", "import asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())"),
    "orjson": (
        "orjson",
        "import json, orjson; json.loads = orjson.loads; "
        "json.dumps = lambda o, *a, **k: orjson.dumps(o, default=k.get('default')).decode()",
    ),
    # As shipped, timed: where each request's time goes (bench/webhook_spans.py), at the cost of a few
    # clock reads per request.
    "spans": ("ephemera", "import bench.webhook_spans; bench.webhook_spans.install()"),
    # An upper bound, not a variant to ship: the intake's two reads before the create of a new PR (the
    # legacy name's object and the repository's closed PRs) skipped, as if both were known absent.
    "noreads": (
        "ephemera",
        "from ephemera.intake import pullrequests, tombstones; "
        "pullrequests.Intake._existing_name = lambda self, event: self.name(event); "
        "tombstones.Tombstones.closed_at = lambda self, repository, pull_request: None",
    ),
    # As shipped, reading the closed PRs and the legacy name per event (EPHEMERA_WEBHOOK_MIRROR=false).
    "nomirror": ("ephemera", "import os; os.environ['EPHEMERA_WEBHOOK_MIRROR'] = 'false'"),
    # The same bound for the closed PRs' read alone (the legacy name's read kept).
    "noclosesread": (
        "ephemera",
        "from ephemera.intake import tombstones; "
        "tombstones.Tombstones.closed_at = lambda self, repository, pull_request: None",
    ),
}


def start(s: Stack, name: str) -> Process:
    environment = process_env(
        s.plane.kubeconfig,
        s.tmp,
        EPHEMERA_LOG_LEVEL="WARNING",
        EPHEMERA_WEBHOOK_SECRET=SECRET,
        BENCH_SPANS_OUT=str(s.tmp / f"spans-{name}.jsonl"),
    )
    proc = Process(["webhook"], environment, s.tmp / f"webhook-{name}.log", int(environment["EPHEMERA_WEBHOOK_PORT"]))
    if name == "before":
        _start_with_prelude(proc, "", cwd=Path(BEFORE))
        wait_for(lambda: _ready(proc.port), timeout=60, what=f"webhook {name}")
        return proc
    runner = RUNNERS[name]
    if runner is None:
        proc.start()
    else:
        _start_with_prelude(proc, runner[1])
    wait_for(lambda: _ready(proc.port), timeout=60, what=f"webhook {name}")
    return proc


def _start_with_prelude(proc: Process, prelude: str, cwd: Path | None = None) -> None:
    """`ephemera webhook` as Process starts it, with `prelude` run first in the same interpreter; from
    the checkout `cwd` (its `ephemera` package before the installed one) if given."""
    log = proc.log_path.open("ab")
    code = f"{prelude}\nimport sys\nfrom ephemera.cli import main\nsys.exit(main(['webhook']))"
    env = {**os.environ, **proc.env}
    if cwd is not None:
        env["PYTHONPATH"] = str(cwd)
    proc.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
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


def same_object_floor(kube: Kube, repo: str) -> tuple[list[float], float]:
    """The bare create of the very object the webhook creates for the same event (its labels,
    annotations, finalizer and spec: Intake._body), in a thread pool of CONCURRENCY like the floor."""
    intake = Intake(
        kube, Tombstones(kube, namespace="default", retention=1), prefix="pr", policies=Policies(Policy(), kube)
    )
    bodies = {}
    for number in range(1, COUNT + 1):
        event = parse_pull_request(pr_event("opened", repo, number, "a" * 40, "2026-01-01T00:00:00Z"))
        bodies[number] = intake._body(event, environment_name(repo, number), str(uuid.uuid4()))

    def one(number: int) -> float:
        started = time.perf_counter()
        kube.create_environment(bodies[number])
        return time.perf_counter() - started

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        latencies = list(pool.map(one, range(1, COUNT + 1)))
    return latencies, time.perf_counter() - started


def _selected(names: list[str]) -> list[str]:
    """The variants named in BENCH_LEVER_VARIANTS (comma-separated), else all of `names`."""
    wanted = [v.strip() for v in os.environ.get("BENCH_LEVER_VARIANTS", "").split(",") if v.strip()]
    return [n for n in names if not wanted or n in wanted or n.removeprefix("floor: ") in wanted]


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    installed = [v for v, r in RUNNERS.items() if r is None or importlib.util.find_spec(r[0]) is not None]
    installed += ["before"] if BEFORE else []
    variants = _selected(installed)
    print(f"webhook variants: {variants}; not installed: {sorted(set(RUNNERS) - set(installed))}", flush=True)
    samples: dict[str, list[float]] = {}
    walls: dict[str, float] = {}
    # Each round's p50 and p99, and its p99 over the same round's floor (threads): does a lever win in
    # every round, or only overall? The load average of each round goes beside them.
    p50s: dict[str, list[float]] = {}
    p99s: dict[str, list[float]] = {}
    loads: list[float] = []
    with stack() as s:
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))
        single = Kube(load_api_client(s.plane.kubeconfig, pool_size=1))
        all_floors: dict[str, Any] = {
            "floor: threads": lambda repo: floor_round(kube, CONCURRENCY, COUNT, repo),
            "floor: threads, no reuse": lambda repo: floor_round(single, CONCURRENCY, COUNT, repo),
            "floor: async": lambda repo: asyncio.run(async_floor(kube, CONCURRENCY, COUNT, repo)),
            "floor: same object": lambda repo: same_object_floor(kube, repo),
        }
        # The floor every ratio is taken against always runs.
        floors = {n: f for n, f in all_floors.items() if n == "floor: threads" or n in _selected(list(all_floors))}
        hooks = {name: start(s, name) for name in variants}
        runs: dict[str, Any] = {
            **{f"webhook: {name}": _hook_run(proc.port, name) for name, proc in hooks.items()},
            **{name: (lambda repo, run=run: run(repo)) for name, run in floors.items()},
        }
        order = list(runs)
        for round_ in range(ROUNDS):
            # Each round starts with another variant, so that none always follows the same one (the
            # one right after the webhooks' creates ran slower, whichever it was).
            shift = round_ % len(order)
            for name in order[shift:] + order[:shift]:
                lat, wall = runs[name](f"lever/{order.index(name)}-{round_}")
                _record(samples, p50s, p99s, walls, name, lat, wall)
            loads.append(os.getloadavg()[0])
            print(f"round {round_ + 1} of {ROUNDS} done, load {loads[-1]:.1f}", flush=True)
        for proc in hooks.values():
            proc.stop()
        kube.close()
        single.close()
        spans = s.tmp / "spans-spans.jsonl"
        if "spans" in hooks:
            report("webhook_spans", breakdown(spans), ["span", "requests", "p50", "p99", "mean", "mean_slowest_1pct"])
    base = summary(samples["floor: threads"])
    floor_p99s = p99s["floor: threads"]
    rows = []
    for name, values in samples.items():
        m = summary(values)
        ratios = [hook / floor for hook, floor in zip(p99s[name], floor_p99s, strict=True)]
        rows.append(
            {
                "variant": name,
                "requests": len(values),
                "p50_ms": m["p50"] * 1000,
                "p99_ms": m["p99"] * 1000,
                "rps": len(values) / walls[name],
                "p99_vs_floor": m["p99"] / base["p99"],
                "round_p99_vs_floor": _spread(ratios),
                "p50_by_round_ms": " ".join(f"{v:.0f}" for v in p50s[name]),
                "p99_by_round_ms": " ".join(f"{v:.0f}" for v in p99s[name]),
                "load_by_round": " ".join(f"{v:.1f}" for v in loads),
            }
        )
    report("webhook_levers", rows, list(rows[0]))


def _hook_run(port: int, name: str) -> Any:
    def run(repo: str) -> tuple[list[float], float]:
        return asyncio.run(webhook_round(port, CONCURRENCY, COUNT, repo))

    return run


def _record(
    samples: dict[str, list[float]],
    p50s: dict[str, list[float]],
    p99s: dict[str, list[float]],
    walls: dict[str, float],
    name: str,
    latencies: list[float],
    wall: float,
) -> None:
    samples.setdefault(name, []).extend(latencies)
    m = summary(latencies)
    p50s.setdefault(name, []).append(m["p50"] * 1000)
    p99s.setdefault(name, []).append(m["p99"] * 1000)
    walls[name] = walls.get(name, 0.0) + wall


if __name__ == "__main__":
    main()
