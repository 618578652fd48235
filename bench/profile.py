"""Where the operator's CPU goes during a burst of PRs, or the webhook's under load at concurrency 16:
py-spy samples of the threads holding the GIL, summed by function (own and inclusive time).
Usage: python -m bench.profile [burst size] | python -m bench.profile webhook [requests]."""

from __future__ import annotations

import asyncio
import collections
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import RESULTS, Watcher, stack
from bench.pr_to_ready import open_prs
from bench.webhook_latency import webhook_round

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


def main() -> None:
    args = sys.argv[1:]
    target = "webhook" if args[:1] == ["webhook"] else "operator"
    numbers = [int(a) for a in args if a.isdigit()]
    size = numbers[0] if numbers else (2000 if target == "webhook" else 200)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    RESULTS.mkdir(parents=True, exist_ok=True)
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
