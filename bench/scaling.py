"""The scaling curves: bursts of N PRs to Ready against the floor for each N, and the operator's idle
footprint with N environments at the default timers; `bench/plots.py` draws them.

Sizes are parameters, so a quick run can use small N:
  BENCH_BURSTS      burst sizes (default 100,500,1000,2000; empty to skip)
  BENCH_FOOTPRINT   idle footprint sizes (default 1000,5000,20000; empty to skip)
  BENCH_IDLE        idle window in seconds per footprint size (default 330: one sweep and
                             one resync at their 300 s defaults)
  BENCH_RESTART     1 to restart the operator after the largest size and measure it again: what
                             a restart with every environment there costs (its first listing)
  BENCH_TRACEMALLOC 1 to run the footprint's operator under tracemalloc (slower, bigger) and
                             report which code's memory grows from one size to the next; `types`
                             to report only which types of objects grow (no tracing: cheap)
"""

from __future__ import annotations

import json
import os
import signal
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.footprint import create, idle
from bench.harness import Stack, Watcher, api_requests, cpu_by_process, delta, process_usage, report, stack
from bench.pr_to_ready import burst, floor
from devtools.controlplane import REPO_ROOT
from devtools.support import wait_for
from ephemera.kube import Kube, load_api_client

WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
MEMPROBE = REPO_ROOT / "bench" / "memprobe"
BURST_COLUMNS = [
    "n",
    "wall_s",
    "floor_wall_s",
    "ratio",
    "wall_per_env_ms",
    "writes_per_env",
    "floor_writes_per_env",
    "load_avg_1m",
]
FOOTPRINT_COLUMNS = [
    "environments",
    "timers",
    "time_to_all_ready_s",
    "idle_cpu_pct_of_one_core",
    "rss_mb",
    "rss_max_mb",
    "apiserver_rss_mb",
    "etcd_rss_mb",
    "load_avg_1m",
]


def sizes(variable: str, default: str) -> list[int]:
    return [int(part) for part in os.environ.get(variable, default).replace(" ", "").split(",") if part]


def writes(requests: dict[str, float]) -> float:
    """API writes of every client (Ephemera, the floor's script, the controllers) in a request-count delta."""
    return sum(v for k, v in requests.items() if k.split(" ", 1)[0] in WRITE_VERBS)


def burst_rows(s: Stack, kube: Kube, watcher: Watcher, bursts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for size in bursts:
        # The floor first, while Ephemera is idle (after a burst its GitHub reports run on for a while).
        before = api_requests(s)
        floor_wall = floor(kube, f"scale/floor{size}", size, 32)
        floor_writes = writes(delta(api_requests(s), before))
        costs: dict[str, Any] = {}
        before = api_requests(s)
        row = burst(s, watcher, f"scale/burst{size}", size, 32, floor_wall, f"burst of {size} -> all Ready", costs)
        # The GitHub reports go on after Ready: count their writes too, once the operator has gone quiet.
        wait_for(lambda: _settled(s), timeout=600, interval=1, what="the operator to go quiet")
        requests = delta(api_requests(s), before)
        ours = writes(requests)
        row |= {
            "wall_per_env_ms": 1000 * row["wall_s"] / size,
            "floor_wall_per_env_ms": 1000 * floor_wall / size,
            "writes_per_env": ours / size,
            "floor_writes_per_env": floor_writes / size,
            "load_avg_1m": os.getloadavg()[0],
            # Which writes an environment costs (verb and resource), to tell what grows with N.
            "writes_by_request_per_env": {
                k: round(v / size, 2) for k, v in requests.items() if k.split(" ", 1)[0] in WRITE_VERBS
            },
        }
        rows.append(row)
        # Written after each size: a run stopped before the largest still leaves the curve so far.
        report("scaling_bursts", rows, BURST_COLUMNS, final=size == bursts[-1])
    return rows


def _settled(s: Stack) -> bool:
    first = cpu_by_process(s).get("operator", 0.0)
    time.sleep(3)
    return cpu_by_process(s).get("operator", 0.0) - first < 0.15


def footprint_rows(
    s: Stack, kube: Kube, counts: list[int], window: float, probe: str, restart: bool = False
) -> list[dict[str, Any]]:
    """The idle footprint at each size; `probe` is "" (plain), "1" (tracemalloc) or "types" (only the
    counts of objects by type, untraced)."""
    env: dict[str, str] = {}
    snapshot = s.tmp / "operator.snapshot"
    traced = probe == "1"
    if probe:
        env = {
            "PYTHONPATH": os.pathsep.join([str(MEMPROBE), os.environ.get("PYTHONPATH", "")]),
            "BENCH_SNAPSHOT": str(snapshot),
        }
    operator = s.start_operator(**env)  # the timers at their defaults
    assert operator.proc is not None
    if traced:
        os.kill(operator.proc.pid, signal.SIGUSR2)  # trace from here on: start-up is not what grows
    watcher = Watcher(s.plane)
    rows: list[dict[str, Any]] = []
    made = 0
    previous: tuple[tracemalloc.Snapshot, dict[str, int]] | None = None
    for size in counts:
        started = time.perf_counter()
        create(kube, made + 1, size + 1)
        made = size
        wait_for(lambda n=size: len(watcher.ready) >= n, timeout=3600, interval=1, what=f"{size} Ready")  # type: ignore[misc]
        row: dict[str, Any] = {
            "environments": size,
            "timers": "defaults" + (", tracemalloc" if traced else ""),
            "time_to_all_ready_s": time.perf_counter() - started,
            # Traced, the idle operator's timers alone take more than the 5% of a core that means quiet.
            **idle(operator.proc.pid, window, quiet=0.5 if traced else 0.05),
            **_control_plane_rss(s),
            "idle_window_s": window,
            "load_avg_1m": os.getloadavg()[0],
        }
        if probe:
            current = _snapshot(operator.proc.pid, snapshot)
            if traced:
                row["traced_mb"] = sum(stat.size for stat in current[0].statistics("filename")) / 2**20
            if previous is not None:
                added = size - rows[-1]["environments"]
                if traced:
                    row["growth"] = _growth(current[0], previous[0], added)
                row["type_growth"] = _type_growth(current[1], previous[1], added)
            previous = current
        rows.append(row)
        # Probed figures are inflated by the probe itself: kept apart from the plain curve.
        name = "scaling_footprint" + {"": "", "1": "_traced", "types": "_types"}[probe]
        report(name, rows, FOOTPRINT_COLUMNS, final=size == counts[-1])
    if restart and not probe:
        rows.append(_restarted(s, made, window))
        report("scaling_footprint", rows, FOOTPRINT_COLUMNS, final=True)
    watcher.stop()
    if s.operator is not None:
        s.operator.stop()
    return rows


def _restarted(s: Stack, made: int, window: float) -> dict[str, Any]:
    """The operator stopped and started again with `made` environments there, measured once idle."""
    assert s.operator is not None
    s.operator.stop()
    started = time.perf_counter()
    operator = s.start_operator()
    assert operator.proc is not None
    figures = idle(operator.proc.pid, window)  # waits for the restart's work to be over first
    return {
        "environments": made,
        "timers": "defaults, restarted",
        "time_to_all_ready_s": None,
        "restart_to_idle_s": time.perf_counter() - started - window,
        **figures,
        **_control_plane_rss(s),
        "idle_window_s": window,
        "load_avg_1m": os.getloadavg()[0],
    }


def _control_plane_rss(s: Stack) -> dict[str, float]:
    """The API server's and etcd's resident memory (MB): what the environments cost outside the operator."""
    rss: dict[str, float] = {}
    for name, proc in s.plane.processes.items():
        if name in ("apiserver", "kube-apiserver", "etcd"):
            key = "etcd_rss_mb" if name == "etcd" else "apiserver_rss_mb"
            rss[key] = process_usage(proc.pid)[1] / 2**20
    return rss


def _snapshot(pid: int, path: Path) -> tuple[tracemalloc.Snapshot, dict[str, int]]:
    """The operator's tracemalloc snapshot and its objects counted by type (bench/memprobe)."""
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    wait_for(path.exists, timeout=300, interval=1, what="the operator's tracemalloc snapshot")
    types: dict[str, int] = json.loads(Path(f"{path}.types.json").read_text())
    return tracemalloc.Snapshot.load(str(path)), types


def _type_growth(current: dict[str, int], previous: dict[str, int], added: int) -> list[str]:
    """The types whose live objects grew most from the previous size, in objects per added environment."""
    diff = {name: count - previous.get(name, 0) for name, count in current.items()}
    top = sorted(diff.items(), key=lambda item: -item[1])[:15]
    return [f"{count / added:.2f}/env {name}" for name, count in top]


def _growth(current: tracemalloc.Snapshot, previous: tracemalloc.Snapshot, added: int) -> list[str]:
    """The code whose live memory grew most from the previous size, in bytes per added environment:
    by the first frame in Ephemera's or kopf's code (or the library that allocated)."""
    by_site: dict[str, int] = {}
    for stat in current.compare_to(previous, "traceback"):
        by_site[_site(stat.traceback)] = by_site.get(_site(stat.traceback), 0) + stat.size_diff
    top = sorted(by_site.items(), key=lambda item: -item[1])[:12]
    return [f"{size / added:.0f} B/env {site}" for site, size in top]


def _site(traceback: tracemalloc.Traceback) -> str:
    for frame in traceback:  # most recent call first
        for marker in ("/ephemera/", "/kopf/", "/kubernetes/", "/aiohttp/", "/sqlalchemy/"):
            if marker in frame.filename:
                return f"{frame.filename.split(marker, 1)[1]}:{frame.lineno} ({marker.strip('/')})"
    frame = traceback[0]
    return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"


def main() -> None:
    bursts = sizes("BENCH_BURSTS", "100,500,1000,2000")
    counts = sizes("BENCH_FOOTPRINT", "1000,5000,20000")
    window = float(os.environ.get("BENCH_IDLE", "330"))
    probe = os.environ.get("BENCH_TRACEMALLOC", "")
    if probe not in ("", "1", "types"):
        raise SystemExit(f"BENCH_TRACEMALLOC={probe!r}: 1, types or unset")
    if bursts:
        # Each curve on its own control plane: neither inherits the other's objects.
        with stack() as s:
            s.start_operator()
            s.start_webhook()
            watcher = Watcher(s.plane)
            kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))
            burst_rows(s, kube, watcher, bursts)
            watcher.stop()
            kube.close()
    if counts:
        with stack() as s:
            kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))
            rows = footprint_rows(s, kube, counts, window, probe, os.environ.get("BENCH_RESTART") == "1")
            kube.close()
        for row in rows:
            for line in row.get("growth", []) + row.get("type_growth", []):
                print(f"  {row['environments']}: {line}")


if __name__ == "__main__":
    main()
