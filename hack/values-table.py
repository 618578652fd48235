"""Write the values table of charts/ephemera/README.md from values.schema.json and values.yaml.

    python hack/values-table.py          rewrite the table between the README's markers
    python hack/values-table.py --check  exit 1 if the README's table is not what would be written

One row per value that holds no other named values (an object of named values is its children's
rows): its dotted path, type, default (from values.yaml) and the schema's description.
tests/test_chart_conventions.py runs --check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "ephemera"
README = CHART / "README.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"


def rows(schema: dict[str, Any], values: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    found = []
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{name}"
        default = values.get(name) if isinstance(values, dict) else None
        if sub.get("properties"):
            found += rows(sub, default or {}, f"{path}.")
            continue
        kind = sub.get("type", "any")
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        if "enum" in sub:
            kind = " \\| ".join(f"`{v}`" for v in sub["enum"])
        shown = "" if name not in (values if isinstance(values, dict) else {}) else f"`{json.dumps(default)}`"
        found.append((f"`{path}`", kind, shown, sub.get("description", "")))
    return found


def table() -> str:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    lines = ["| Value | Type | Default | Description |", "|---|---|---|---|"]
    for row in rows(schema, values):
        lines.append(
            "| " + " | ".join(cell.replace("|", "\\|") if i == 3 else cell for i, cell in enumerate(row)) + " |"
        )
    return "\n".join(lines)


def rendered(readme: str) -> str:
    before, start, rest = readme.partition(START)
    _, end, after = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{README} lacks the markers {START} and {END}")
    return f"{before}{START}\n{table()}\n{END}{after}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the README's table is out of date")
    args = parser.parse_args()
    current = README.read_text()
    fresh = rendered(current)
    if args.check:
        if fresh != current:
            print(f"{README} is out of date: run make chart-readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
