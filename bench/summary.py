"""The median and the spread (min-max) of every figure over the runs kept in bench/results/<name>/.
Usage: python -m bench.summary [name ...] (default: every benchmark with runs)."""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

from bench.harness import RESULTS

KEYS = ("case", "concurrency", "environments", "timers")  # what names a row, per benchmark


def summarise(name: str) -> None:
    runs = sorted((RESULTS / name).glob("*.json"))
    if not runs:
        return
    by_row: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for row in json.loads(run.read_text())["rows"]:
            key = ", ".join(str(row[k]) for k in KEYS if k in row)
            by_row.setdefault(key, []).append(row)
    print(f"\n{name}: {len(runs)} runs (median, then min-max)")
    for key, rows in by_row.items():
        figures = []
        for column in rows[0]:
            values = [r[column] for r in rows if isinstance(r.get(column), int | float) and column not in KEYS]
            if not values:
                continue
            median = statistics.median(values)
            spread = f" ({min(values):.3g}-{max(values):.3g})" if len(values) > 1 else ""
            figures.append(f"{column} {median:.3g}{spread}")
        print(f"  {key} [n={len(rows)}]: " + ", ".join(figures))


def main() -> None:
    names = sys.argv[1:] or sorted(p.name for p in RESULTS.iterdir() if p.is_dir())
    for name in names:
        summarise(name)


if __name__ == "__main__":
    main()
