"""Draw the scaling curves from the latest results in bench/results/ into bench/plots/*.png.
Usage: python -m bench.plots (after bench.scaling and bench.webhook_latency)."""

from __future__ import annotations

import json
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine

import matplotlib.pyplot as plt

from bench.harness import RESULTS
from devtools.controlplane import REPO_ROOT

PLOTS = REPO_ROOT / "bench" / "plots"


def rows(name: str) -> list[dict[str, Any]]:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        print(f"no {path.relative_to(REPO_ROOT)}: its plot is skipped")
        return []
    data: list[dict[str, Any]] = json.loads(path.read_text())["rows"]
    return data


def _save(figure: Any, name: str, note: str) -> None:
    figure.text(0.01, 0.01, note, fontsize=7, color="gray")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    PLOTS.mkdir(exist_ok=True)
    figure.savefig(PLOTS / name, dpi=110)
    plt.close(figure)
    print(f"wrote {(PLOTS / name).relative_to(REPO_ROOT)}")


def _load_note(data: list[dict[str, Any]]) -> str:
    loads = [r["load_avg_1m"] for r in data if "load_avg_1m" in r]
    shared = "2 shared cores"
    return f"{shared}, 1-min load {min(loads):.0f}-{max(loads):.0f} during the run" if loads else shared


Line = tuple[list[float], str, str | None]  # the values, the matplotlib style, the legend's label


def _panel(axes: Any, n: list[int], lines: list[Line], xlabel: str, ylabel: str, title: str) -> None:
    """One panel of curves against N, from zero up, with a legend when a line is labelled."""
    for values, style, label in lines:
        axes.plot(n, values, style, label=label)
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes.set_ylim(bottom=0)
    if any(label for _, _, label in lines):
        axes.legend()


def bursts() -> None:
    data = sorted(rows("scaling_bursts"), key=lambda r: r["n"])
    if not data:
        return
    n = [r["n"] for r in data]
    figure, (wall, writes) = plt.subplots(1, 2, figsize=(10, 4))
    per_env = "PRs in the burst (N)"
    _panel(
        wall,
        n,
        [
            ([r["wall_per_env_ms"] for r in data], "o-", "Ephemera (webhook + operator)"),
            ([r["floor_wall_per_env_ms"] for r in data], "s--", "floor (raw API writes)"),
        ],
        per_env,
        "wall time per environment (ms)",
        "Burst to Ready",
    )
    _panel(
        writes,
        n,
        [
            ([r["writes_per_env"] for r in data], "o-", "Ephemera"),
            ([r["floor_writes_per_env"] for r in data], "s--", "floor"),
        ],
        per_env,
        "API writes per environment (all clients)",
        "API writes",
    )
    _save(figure, "bursts.png", _load_note(data))


def footprint() -> None:
    data = sorted(rows("scaling_footprint"), key=lambda r: r["environments"])
    if not data:
        return
    n = [r["environments"] for r in data]
    figure, (rss, cpu) = plt.subplots(1, 2, figsize=(10, 4))
    rss.axhline(600, color="red", linewidth=0.8, label="target at 20,000: 600 MB")
    idle = "idle environments (N)"
    _panel(
        rss,
        n,
        [
            ([r["rss_mb"] for r in data], "o-", "RSS at the end of the idle window"),
            ([r["rss_max_mb"] for r in data], "^:", "RSS peak in the window"),
        ],
        idle,
        "operator RSS (MB)",
        "Memory, timers at defaults",
    )
    cpu_line: Line = ([r["idle_cpu_pct_of_one_core"] for r in data], "o-", None)
    _panel(cpu, n, [cpu_line], idle, "idle CPU (% of one core)", "Idle CPU, timers at defaults")
    _save(figure, "footprint.png", _load_note(data))


def webhook() -> None:
    data = sorted(rows("webhook_latency"), key=lambda r: r["concurrency"])
    if not data:
        return
    c = [r["concurrency"] for r in data]
    figure, axes = plt.subplots(figsize=(6, 4))
    for who, style in (("webhook", "o-"), ("floor", "s--")):
        for q in ("p50", "p99"):
            axes.plot(c, [r[f"{who}_{q}_ms"] for r in data], style, label=f"{who} {q}")
    axes.set_xscale("log", base=2)
    axes.set(xlabel="concurrency", ylabel="acknowledgement latency (ms)", title="Webhook against a bare create")
    axes.legend()
    _save(figure, "webhook_latency.png", _load_note(data))


def main() -> None:
    bursts()
    footprint()
    webhook()


if __name__ == "__main__":
    main()
