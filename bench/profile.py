"""Where the operator's CPU goes during a burst of PRs, or the webhook's under load at concurrency 16,
or the operator's while idle with N Ready environments: py-spy samples of the threads holding the GIL,
summed by function (own and inclusive time).
Usage: python -m bench.profile [burst size] | python -m bench.profile webhook [requests]
| python -m bench.profile idle [N ...].

The idle mode measures each N (cumulative: 1,000 then 5,000 creates 4,000 more) over one window at the
default intervals (330 s: one sweep and one resync), with the operator restarted for each window. With
BENCH_IDLE_BASE=<a checkout of other code> it alternates that code's operator with this one's on the
same objects (BENCH_IDLE_ROUNDS rounds, the order rotated per round), for a before/after on the shared
machine."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.footprint import DEFAULT_WINDOW, create, idle
from bench.harness import RESULTS, Stack, Watcher, report, stack
from bench.pr_to_ready import open_prs
from bench.webhook_latency import webhook_round
from devtools.support import wait_for
from ephemera.kube import Kube, load_api_client

TOP = 35


def summarise(raw: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Own and inclusive samples per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
            for f in stack_text.split(";")
            if " (" in f
        ]
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return own, inclusive, total


def record(spy: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    options = ["--gil", "--format", "raw", "--rate", "200", "--nonblocking"]
    recorder = subprocess.Popen(
        [spy, "record", *options, "--pid", str(pid), "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)  # py-spy attaches
    return recorder


def idle_profiles(spy: str, sizes: list[int]) -> None:
    """Idle CPU, RSS and a profile per window, for each size and each code under comparison."""
    base = os.environ.get("BENCH_IDLE_BASE")
    rounds = int(os.environ.get("BENCH_IDLE_ROUNDS", "1"))
    window = float(os.environ.get("BENCH_IDLE_WINDOW", str(DEFAULT_WINDOW)))
    trees: list[tuple[str, dict[str, str]]] = [("this", {})]
    if base:
        # Imports from the other checkout: its path first, and not the working directory's (this one).
        trees.append(("base", {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(Path(base).resolve())}))
    rows: list[dict[str, object]] = []
    with stack() as s:
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))
        made = 0
        for size in sizes:
            operator = s.start_operator()
            watcher = Watcher(s.plane)
            started = time.perf_counter()
            create(kube, made + 1, size + 1)
            made = size
            wait_for(lambda n=size, w=watcher: len(w.ready) >= n, timeout=3600, interval=1, what=f"{size} Ready")  # type: ignore[misc]
            print(f"{size} Ready in {time.perf_counter() - started:.0f} s", flush=True)
            watcher.stop()
            operator.stop()
            for turn in range(rounds):
                for label, env in trees[turn % len(trees) :] + trees[: turn % len(trees)]:
                    rows.append(
                        {
                            "environments": size,
                            "code": label,
                            "round": turn + 1,
                            **_window(s, spy, env, window, f"idle-{size}-{label}-{turn + 1}"),
                        }
                    )
                    print(rows[-1], flush=True)
        kube.close()
    report(
        "idle-profile",
        rows,
        ["environments", "code", "round", "idle_cpu_pct_of_one_core", "rss_mb", "rss_max_mb", "load"],
    )


def _window(s: Stack, spy: str, env: dict[str, str], seconds: float, name: str) -> dict[str, object]:
    operator = s.start_operator(**env)
    assert operator.proc is not None
    pid = operator.proc.pid
    out = RESULTS / f"{name}.txt"
    # The profile and the CPU figure cover the same window, once the restart's resume work is over.
    recorder: list[subprocess.Popen[bytes]] = []
    figures: dict[str, object] = dict(idle(pid, seconds, on_start=lambda: recorder.append(record(spy, pid, out))))
    figures["load"] = os.getloadavg()[0]
    recorder[0].send_signal(signal.SIGINT)
    recorder[0].wait(timeout=60)
    _, inclusive, total = summarise(out.read_text())
    figures["samples"] = total
    print(f"{name}: {total} samples holding the GIL; top by inclusive samples")
    for function, count in inclusive.most_common(TOP):
        print(f"{count:6d} {100 * count / max(total, 1):5.1f}%  {function}")
    operator.stop()
    return figures


def main() -> None:
    args = sys.argv[1:]
    target = "webhook" if args[:1] == ["webhook"] else "operator"
    numbers = [int(a) for a in args if a.isdigit()]
    size = numbers[0] if numbers else (2000 if target == "webhook" else 200)
    spy = os.environ.get("PY_SPY") or shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args[:1] == ["idle"]:
        idle_profiles(spy, numbers or [1000, 5000])
        return
    out = RESULTS / f"{target}-profile.txt"
    with stack() as s:
        webhook = s.start_webhook()
        if target == "webhook":
            assert webhook.proc is not None
            recorder = record(spy, webhook.proc.pid, out)
            _, wall = asyncio.run(webhook_round(webhook.port, 16, size, "bench/profile"))
            print(f"{size} requests at concurrency 16 in {wall:.1f} s")
        else:
            operator = s.start_operator()
            watcher = Watcher(s.plane)
            assert operator.proc is not None
            recorder = record(spy, operator.proc.pid, out)
            started = time.perf_counter()
            open_prs(s, watcher, "bench/profile", list(range(1, size + 1)), 32)
            print(f"burst of {size}: all Ready in {time.perf_counter() - started:.1f} s")
            watcher.stop()
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
    own, inclusive, total = summarise(out.read_text())
    print(f"{total} samples holding the GIL")
    for title, counter in (("own", own), ("inclusive", inclusive)):
        print(f"\ntop {TOP} by {title} samples")
        for name, count in counter.most_common(TOP):
            print(f"{count:6d} {100 * count / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
