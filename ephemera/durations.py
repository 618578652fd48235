"""Durations as people write them on a command line: `90s`, `15m`, `2h`, `14d`, `1w`, `1h30m`."""

from __future__ import annotations

import datetime
import re

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> datetime.timedelta:
    """`2h` -> 2 hours; parts add up (`1h30m`). A ValueError that says what is accepted otherwise."""
    value = text.strip().lower()
    parts = _PART.findall(value)
    if not value or "".join(f"{n}{u}" for n, u in parts) != value:
        raise ValueError(f"{text!r} is not a duration: write a number and a unit (s, m, h, d, w), e.g. 2h, 14d, 1h30m")
    seconds = sum(int(number) * UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return datetime.timedelta(seconds=seconds)


def format_time(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with a Z and whole seconds, as Kubernetes writes times."""
    return moment.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
