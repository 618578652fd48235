"""Where a webhook request's wall time goes at concurrency: timing spans per delivery, taken inside
the webhook process (bench.webhook_levers' `spans` variant imports this module and calls `install()`
before `ephemera webhook` starts; it writes one JSON line per request to BENCH_SPANS_OUT on exit).

Spans of one `pull_request` delivery, in order:
  pre      handler entered -> Intake.handle submitted to the thread pool (body, HMAC, JSON, pydantic)
  queue    submitted -> a pool thread starts it (waiting for a thread, and for the GIL)
  api      each Kubernetes request the intake makes, by method and kind (GET environment, GET ConfigMap,
           LIST templates, POST environment), as urllib3 sees it (including waiting for the GIL)
  intake   the rest of Intake.handle (the policy, building the body)
  resume   Intake.handle returned -> the handler returned its answer (the loop noticing the result, the
           metrics, the answer's JSON)
The client-side latency adds to these the HTTP request's and answer's handling in aiohttp and in the
load generator.
"""

from __future__ import annotations

import atexit
import json
import os
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_SPANS: dict[str, dict[str, Any]] = {}
_current = threading.local()


def _kind(method: str, path: str) -> str:
    if "/configmaps" in path:
        return f"{method} configmap"
    if "/previewtemplates" in path:
        return f"{method} templates"
    if "/previewenvironments" in path:
        return f"{method} environment"
    return f"{method} other"


def install() -> None:
    """Wrap the webhook's handler, its thread pool and Kube._request to time each delivery's spans."""
    from aiohttp import web

    from ephemera.kube import Kube
    from ephemera.webhook import app as webhook_app

    handler = webhook_app.webhook

    async def timed(request: web.Request) -> web.Response:
        delivery = request.headers.get("X-GitHub-Delivery", "")
        span = _SPANS.setdefault(delivery, {"api": []})
        span["enter"] = time.perf_counter()
        try:
            return await handler(request)
        finally:
            span["leave"] = time.perf_counter()

    webhook_app.webhook = timed  # create_app reads the module's name when it runs

    class TimedPool(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
            if getattr(fn, "__name__", "") != "handle" or len(args) < 2 or not isinstance(args[1], str):
                return super().submit(fn, *args, **kwargs)
            span = _SPANS.setdefault(args[1], {"api": []})
            span["submit"] = time.perf_counter()

            def run(*inner: Any) -> Any:
                span["start"] = time.perf_counter()
                _current.span = span
                try:
                    return fn(*inner)
                finally:
                    _current.span = None
                    span["end"] = time.perf_counter()

            return super().submit(run, *args, **kwargs)

    webhook_app.ThreadPoolExecutor = TimedPool  # type: ignore[attr-defined]  # the name create_app builds its pool from

    request = Kube._request

    def timed_request(self: Kube, method: str, path: str, **kwargs: Any) -> Any:
        span = getattr(_current, "span", None)
        started = time.perf_counter()
        try:
            return request(self, method, path, **kwargs)
        finally:
            if span is not None:
                span["api"].append((_kind(method, path), time.perf_counter() - started))

    Kube._request = timed_request  # type: ignore[method-assign]
    atexit.register(_write, Path(os.environ["BENCH_SPANS_OUT"]))


def _write(out: Path) -> None:
    with out.open("w") as f:
        for delivery, span in _SPANS.items():
            if {"enter", "submit", "start", "end", "leave"} <= span.keys():
                f.write(json.dumps({"delivery": delivery, **span}) + "\n")


def breakdown(out: Path) -> list[dict[str, Any]]:
    """Per span: p50, p99 and mean over the requests (ms), and its mean among the slowest 1% of them."""
    spans = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = sorted({kind for s in spans for kind, _ in s["api"]})
    rows: dict[str, list[float]] = {}
    totals: list[float] = []
    for s in spans:
        api = sum(seconds for _, seconds in s["api"])
        parts = {
            "total (handler)": s["leave"] - s["enter"],
            "pre": s["submit"] - s["enter"],
            "queue": s["start"] - s["submit"],
            "intake (no API)": s["end"] - s["start"] - api,
            "resume": s["leave"] - s["end"],
            "api calls": float(len(s["api"])),
            **dict.fromkeys(kinds, 0.0),
        }
        for kind, seconds in s["api"]:
            parts[kind] = parts.get(kind, 0.0) + seconds
        for name, value in parts.items():
            rows.setdefault(name, []).append(value)
        totals.append(parts["total (handler)"])
    slow = sorted(range(len(spans)), key=lambda i: totals[i])[-max(1, len(spans) // 100) :]
    result = []
    for name, values in rows.items():
        scale = 1.0 if name == "api calls" else 1000.0
        ordered = sorted(values)

        def pick(q: float, ordered: list[float] = ordered) -> float:
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

        present = [values[i] for i in slow]
        result.append(
            {
                "span": name,
                "requests": len(values),
                "p50": pick(0.5) * scale,
                "p99": pick(0.99) * scale,
                "mean": statistics.fmean(values) * scale,
                "mean_slowest_1pct": statistics.fmean(present) * scale,
            }
        )
    return result
