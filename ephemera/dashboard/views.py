"""What the dashboard's pages show, computed from PreviewEnvironment objects and records: pure
functions, no I/O, so that each can be tested without a cluster or a database.

Every string that comes from a PR (title, branch, author, and the URL a template renders from them)
is passed to the templates as it is: Jinja2 escapes it there (autoescape is on), and links are only
made of http(s) URLs.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from ephemera.api.models import Phase, parse_time

Obj = Mapping[str, Any]
PHASES = tuple(phase.value for phase in Phase)
# Object names as the API server allows them for a cluster-scoped custom resource (DNS subdomain).
NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# What the operator exports for the totals page (ephemera/github/outbox.py, ephemera/store/records.py).
RATE_LIMIT_METRIC = "ephemera_github_rate_limit_remaining"
BACKLOG_METRIC = "ephemera_record_backlog"


def github_web_url(api_url: str) -> str:
    """GitHub's web address for an API base URL: api.github.com -> github.com, and GitHub
    Enterprise's https://host/api/v3 -> https://host."""
    parts = urlsplit(api_url.rstrip("/"))
    if parts.hostname == "api.github.com":
        return "https://github.com"
    path = parts.path[: -len("/api/v3")] if parts.path.endswith("/api/v3") else parts.path
    return f"{parts.scheme}://{parts.netloc}{path}"


def safe_link(url: Any) -> str | None:
    """`url` if it is an absolute http(s) URL, else None: a template may render a `javascript:` URL
    from a PR's values, which must never become a link."""
    if not isinstance(url, str) or not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme in ("http", "https") and parts.netloc else None


def age(then: datetime.datetime | None, now: datetime.datetime) -> str:
    """An age as kubectl prints it: 45s, 12m, 5h, 3d."""
    if then is None:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Row:
    """One environment in the list."""

    name: str
    repository: str
    pull_request: int | None
    pr_url: str | None
    title: str
    branch: str
    phase: str
    reason: str
    message: str
    namespace: str
    url: str | None
    created: str
    age: str
    last_transition: str
    last_transition_age: str
    deleting: bool


def environment_row(obj: Obj, web_url: str, now: datetime.datetime) -> Row:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    repository = str(spec.get("repository") or "")
    number = spec.get("pullRequest")
    number = number if isinstance(number, int) and not isinstance(number, bool) else None
    created = str(meta.get("creationTimestamp") or "")
    transition = str(status.get("lastTransitionTime") or "")
    return Row(
        name=str(meta.get("name") or ""),
        repository=repository,
        pull_request=number,
        pr_url=f"{web_url}/{repository}/pull/{number}" if repository and number is not None else None,
        title=str(spec.get("title") or ""),
        branch=str(spec.get("branch") or ""),
        phase=str(status.get("phase") or Phase.PENDING.value),
        reason=str(status.get("reason") or ""),
        message=str(status.get("message") or ""),
        namespace=str(status.get("namespace") or ""),
        url=safe_link(status.get("url")),
        created=created,
        age=age(_time(created), now),
        last_transition=transition,
        last_transition_age=age(_time(transition), now),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def _time(value: str | None) -> datetime.datetime | None:
    try:
        return parse_time(value)
    except ValueError:
        return None


def rows(objects: Iterable[Obj], web_url: str, now: datetime.datetime, *, repository: str, phase: str) -> list[Row]:
    """The list, filtered (an empty filter keeps all), newest first."""
    found = [environment_row(obj, web_url, now) for obj in objects]
    found = [r for r in found if (not repository or r.repository == repository) and (not phase or r.phase == phase)]
    return sorted(found, key=lambda r: (r.created, r.name), reverse=True)


def repositories(objects: Iterable[Obj]) -> list[str]:
    return sorted({str((obj.get("spec") or {}).get("repository") or "") for obj in objects} - {""})


def phase_counts(objects: Iterable[Obj]) -> dict[str, int]:
    """Environments by phase, every phase listed (0 included), in the lifecycle's order."""
    counts = dict.fromkeys(PHASES, 0)
    for obj in objects:
        phase = str((obj.get("status") or {}).get("phase") or Phase.PENDING.value)
        counts[phase] = counts.get(phase, 0) + 1
    return counts


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile (q in 0..100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Bucket:
    """One hour of the time-to-Ready chart."""

    start: datetime.datetime
    count: int
    p50: float | None
    p95: float | None


@dataclass(frozen=True)
class Chart:
    """Time to Ready over a day, as an inline SVG draws it (coordinates computed here)."""

    width: int
    height: int
    top: float  # the y axis' largest value, in seconds
    p50_points: str
    p95_points: str
    # (x, y, p50 or p95, title) of each hour's two points: an hour alone draws no line.
    dots: list[tuple[float, float, str, str]] = field(default_factory=list)
    labels: list[tuple[float, str]] = field(default_factory=list)  # (x, text) under the axis


@dataclass(frozen=True)
class ReadyTimes:
    count: int
    p50: float | None
    p95: float | None
    buckets: list[Bucket]
    chart: Chart | None


def ready_times(
    samples: Iterable[tuple[datetime.datetime, float]],
    now: datetime.datetime,
    *,
    hours: int = 24,
    width: int = 480,
    height: int = 120,
) -> ReadyTimes:
    """Time to Ready (seconds, by the time each became Ready) over the last `hours`: p50 and p95 of
    all, and per hour for the chart."""
    start = now - datetime.timedelta(hours=hours)
    kept = [(at, seconds) for at, seconds in samples if start <= at <= now]
    per_hour: list[list[float]] = [[] for _ in range(hours)]
    for at, seconds in kept:
        index = min(hours - 1, int((at - start).total_seconds() // 3600))
        per_hour[index].append(seconds)
    buckets = [
        Bucket(start + datetime.timedelta(hours=i), len(v), percentile(v, 50), percentile(v, 95))
        for i, v in enumerate(per_hour)
    ]
    values = [seconds for _, seconds in kept]
    return ReadyTimes(
        count=len(values),
        p50=percentile(values, 50),
        p95=percentile(values, 95),
        buckets=buckets,
        chart=_chart(buckets, width, height) if values else None,
    )


def _chart(buckets: Sequence[Bucket], width: int, height: int) -> Chart:
    top = max(b.p95 or 0.0 for b in buckets) or 1.0
    step = width / len(buckets)
    pad = 4.0

    def x(i: int) -> float:
        return round(step * i + step / 2, 1)

    def y(value: float) -> float:
        return round(height - pad - (height - 2 * pad) * value / top, 1)

    def points(pick: str) -> str:
        return " ".join(f"{x(i)},{y(getattr(b, pick))}" for i, b in enumerate(buckets) if getattr(b, pick) is not None)

    dots = []
    for i, b in enumerate(buckets):
        if b.p95 is not None and b.p50 is not None:
            title = f"{b.start:%H}:00 UTC: p50 {b.p50:.1f} s, p95 {b.p95:.1f} s, {b.count} environment(s)"
            dots += [(x(i), y(b.p95), "p95", title), (x(i), y(b.p50), "p50", title)]
    labels = [(x(i), f"{b.start:%H}h") for i, b in enumerate(buckets) if i % 6 == 0]
    return Chart(width, height, top, points("p50"), points("p95"), dots, labels)


@dataclass(frozen=True)
class OperatorFigures:
    """What the dashboard reads from the operator's /metrics; `error` says why a figure is missing."""

    rate_limit_remaining: float | None = None
    record_backlog: float | None = None
    error: str | None = None


def operator_figures(text: str) -> OperatorFigures:
    """The GitHub rate limit left and the record backlog, from the operator's Prometheus text. The
    rate limit is -1 until the operator's first GitHub answer: shown as unknown."""
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in (RATE_LIMIT_METRIC, BACKLOG_METRIC):
                    found[sample.name] = sample.value
    except ValueError as err:
        return OperatorFigures(error=f"the operator's metrics could not be read: {err}")
    remaining = found.get(RATE_LIMIT_METRIC)
    return OperatorFigures(
        rate_limit_remaining=remaining if remaining is not None and remaining >= 0 else None,
        record_backlog=found.get(BACKLOG_METRIC),
        error=None if found else "the operator's metrics hold neither figure",
    )


def environment_page(name: str, obj: Obj | None, web_url: str, now: datetime.datetime) -> dict[str, Any]:
    """What the environment page shows of the object (None once it is gone: records only)."""
    status = (obj or {}).get("status") or {}
    return {
        "name": name,
        "row": environment_row(obj, web_url, now) if obj else None,
        "spec": (obj or {}).get("spec") or {},
        "conditions": status.get("conditions") or [],
        "reports": reports(status),
    }


def sorted_events(events: Iterable[Obj]) -> list[dict[str, Any]]:
    """Kubernetes Events of one object, oldest first, as the environment page lists them."""
    listed = []
    for e in events:
        when = e.get("lastTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp")
        listed.append(
            {
                "time": str(when or ""),
                "type": str(e.get("type") or ""),
                "reason": str(e.get("reason") or ""),
                "source": str(e.get("reportingComponent") or (e.get("source") or {}).get("component") or ""),
                "count": e.get("count") or 1,
                "message": str(e.get("message") or ""),
            }
        )
    return sorted(listed, key=lambda e: e["time"])


def reports(status: Obj) -> list[tuple[str, str]]:
    """What was reported to GitHub (status.reported: each kind of report -> phase@commit, ids)."""
    reported = status.get("reported") or {}
    return sorted((str(key), str(value)) for key, value in reported.items()) if isinstance(reported, dict) else []
