"""Operator memory (RSS) across a PostgreSQL outage with many environments, and the catch-up after it.

    python -m bench.records_outage [--environments 1000] [--outage 600] [--resync 300] [--churn 0]

A fresh control plane and PostgreSQL; the operator records to it. Once every environment is Ready
and recorded, PostgreSQL is stopped for `--outage` seconds. Meanwhile the operator's resync comes
round every `--resync` seconds, and `--churn` environments get a new commit every 30 s (two
transitions each: Updating, Ready) so that the records queue has something to hold. RSS, the
records backlog and the resyncs run or skipped are sampled every 30 s; then PostgreSQL comes back
and the time until the records have caught up is measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.footprint import create
from bench.harness import Watcher, process_usage, report, stack
from devtools.postgres import Postgres
from devtools.support import wait_for
from ephemera.api.naming import environment_name
from ephemera.kube import Kube, load_api_client

SAMPLE_EVERY = 30.0
REPO = "bench/idle"  # what bench.footprint.create names its environments after


def metrics(port: int) -> dict[str, float]:
    """The operator's own figures, summed over labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        key = name.split("{", 1)[0]
        if "{" in name:
            key += "{" + name.split("{", 1)[1]
        found[key] = found.get(key, 0.0) + float(value)
    return found


def figure(values: dict[str, float], name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return sum(v for k, v in values.items() if k.split("{")[0] == name and want in k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--environments", type=int, default=1000)
    parser.add_argument("--outage", type=float, default=600.0, help="seconds PostgreSQL stays down")
    parser.add_argument("--resync", type=float, default=300.0, help="EPHEMERA_RESYNC_INTERVAL of the operator")
    parser.add_argument("--churn", type=int, default=0, help="environments given a new commit every 30 s")
    parser.add_argument("--queue-limit", type=int, default=0, help="EPHEMERA_RECORD_QUEUE_LIMIT (0: the default)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ephemera-pg-") as pg_dir, stack() as s:
        postgres = Postgres(Path(pg_dir)).init()
        postgres.start()
        extra = {"EPHEMERA_RECORD_QUEUE_LIMIT": str(args.queue_limit)} if args.queue_limit else {}
        operator = s.start_operator(
            EPHEMERA_DATABASE_URL=postgres.url, EPHEMERA_RESYNC_INTERVAL=str(args.resync), **extra
        )
        assert operator.proc is not None
        pid, port = operator.proc.pid, operator.port
        kube = Kube(load_api_client(s.plane.kubeconfig, pool_size=64))
        watcher = Watcher(s.plane)
        started = time.perf_counter()
        create(kube, 1, args.environments + 1)
        wait_for(lambda: len(watcher.ready) >= args.environments, timeout=1800, interval=1, what="all Ready")
        print(f"{args.environments} Ready in {time.perf_counter() - started:.0f} s", flush=True)
        wait_for(lambda: figure(metrics(port), "ephemera_record_backlog") == 0, timeout=600, interval=1)

        def sample(phase: str, t0: float) -> dict[str, Any]:
            values = metrics(port)
            row = {
                "phase": phase,
                "t_s": round(time.perf_counter() - t0),
                "rss_mb": process_usage(pid)[1] / 2**20,
                "backlog": figure(values, "ephemera_record_backlog"),
                "dropped": figure(values, "ephemera_record_dropped_total"),
                "resyncs_run": figure(values, "ephemera_record_resyncs_total", outcome="run"),
                "resyncs_skipped": figure(values, "ephemera_record_resyncs_total", outcome="skipped"),
            }
            print(row, flush=True)
            return row

        rows.append(sample("before", time.perf_counter()))
        postgres.stop()
        t0 = time.perf_counter()
        numbers = itertools.cycle(range(1, args.environments + 1))
        next_sample = SAMPLE_EVERY
        commit = 0
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            while time.perf_counter() - t0 < args.outage:
                if args.churn:
                    commit += 1
                    sha = f"{commit:040x}"
                    batch = [next(numbers) for _ in range(args.churn)]
                    list(pool.map(push, [kube] * len(batch), batch, [sha] * len(batch)))
                time.sleep(max(0.0, t0 + min(next_sample, args.outage) - time.perf_counter()))
                rows.append(sample("outage", t0))
                next_sample += SAMPLE_EVERY
        postgres.start()
        back = time.perf_counter()
        wait_for(
            lambda: figure(metrics(port), "ephemera_record_backlog") == 0, timeout=1800, interval=1, what="catch-up"
        )
        row = sample("caught up", t0)
        row["catch_up_s"] = round(time.perf_counter() - back, 1)
        rows.append(row)
        watcher.stop()
        kube.close()
        postgres.stop()
    for row in rows:
        row["environments"] = args.environments
        row["outage_s"] = args.outage
        row["resync_interval_s"] = args.resync
        row["churn_per_min"] = args.churn
    report(
        "records_outage",
        rows,
        ["phase", "t_s", "rss_mb", "backlog", "dropped", "resyncs_run", "resyncs_skipped", "catch_up_s"],
    )


def push(kube: Kube, number: int, sha: str) -> None:
    kube.patch_environment(environment_name(REPO, number), {"spec": {"commitSha": sha}})


if __name__ == "__main__":
    main()
