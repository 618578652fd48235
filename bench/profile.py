"""Where the operator's CPU goes during a burst of PRs: py-spy samples of the threads holding the GIL,
summed by function (own time and inclusive time). Usage: python -m bench.profile [burst size]."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import time

from bench.harness import RESULTS, Watcher, stack
from bench.pr_to_ready import open_prs

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


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    spy = shutil.which("py-spy") or str(__import__("pathlib").Path(sys.executable).parent / "py-spy")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "operator-profile.txt"
    with stack() as s:
        operator = s.start_operator()
        s.start_webhook()
        watcher = Watcher(s.plane)
        assert operator.proc is not None
        recorder = subprocess.Popen(
            [
                spy,
                "record",
                "--gil",
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "--pid",
                str(operator.proc.pid),
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)  # py-spy attaches
        started = time.perf_counter()
        open_prs(s, watcher, "bench/profile", list(range(1, size + 1)), 32)
        print(f"burst of {size}: all Ready in {time.perf_counter() - started:.1f} s")
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
        watcher.stop()
    own, inclusive, total = summarise(out.read_text())
    print(f"{total} samples holding the GIL")
    for title, counter in (("own", own), ("inclusive", inclusive)):
        print(f"\ntop {TOP} by {title} samples")
        for name, count in counter.most_common(TOP):
            print(f"{count:6d} {100 * count / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
