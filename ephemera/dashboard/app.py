"""The dashboard's aiohttp application: read-only pages of the environments, one environment, and
the totals, with live updates of the list through server-sent events.

It is a process of its own (`ephemera dashboard`) with its own listener: never the public webhook's.
It only reads: the cluster through one list and watch (ephemera.dashboard.cluster) and Events on
demand, the records database, and the operator's /metrics. Pages are Jinja2 templates with
autoescape on, served with a Content-Security-Policy that allows no inline script or style, so a
PR's title or branch can only ever show as text.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from sqlalchemy.ext.asyncio import AsyncEngine

from ephemera import __version__
from ephemera.api.models import KIND
from ephemera.config import Settings
from ephemera.dashboard import records, views
from ephemera.dashboard.cluster import EnvironmentWatch
from ephemera.kube import Kube, KubeError, load_api_client
from ephemera.store.engine import make_engine
from ephemera.store.queries import history

log = logging.getLogger("ephemera.dashboard")

STATIC = Path(__file__).parent / "static"
# Same-origin scripts, styles and fetches only; no inline code, no frames, no plugins, no other
# origin. Inline SVG's presentation attributes are not CSS and need no 'unsafe-inline'.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
# How long one read of the records database, the Events or the operator's /metrics may take before
# the page shows what it has and says what is missing.
READ_TIMEOUT = 5.0
# Server-sent events: a comment this often keeps proxies from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0
DAY = datetime.timedelta(days=1)

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
WATCH: web.AppKey[EnvironmentWatch] = web.AppKey("watch", EnvironmentWatch)
KUBE: web.AppKey[Kube] = web.AppKey("kube", Kube)
ENGINE: web.AppKey[AsyncEngine] = web.AppKey("engine", AsyncEngine)
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)
TEMPLATES: web.AppKey[Environment] = web.AppKey("templates", Environment)
EXECUTOR: web.AppKey[ThreadPoolExecutor] = web.AppKey("executor", ThreadPoolExecutor)
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)


def templates() -> Environment:
    return Environment(
        loader=PackageLoader("ephemera.dashboard", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as err:
        err.headers.update(SECURITY_HEADERS)
        raise
    if not response.prepared:  # a stream's headers were set before it started
        response.headers.update(SECURITY_HEADERS)
    return response


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    page = request.app[TEMPLATES].get_template(template).render(version=__version__, path=request.path, **context)
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


def _filters(request: web.Request) -> tuple[str, str]:
    return request.query.get("repository", "").strip(), request.query.get("phase", "").strip()


def _rows(request: web.Request) -> list[views.Row]:
    repository, phase = _filters(request)
    watch = request.app[WATCH]
    web_url = views.github_web_url(request.app[SETTINGS].github_api_url)
    now = datetime.datetime.now(datetime.UTC)
    return views.rows(watch.objects.values(), web_url, now, repository=repository, phase=phase)


async def environments_page(request: web.Request) -> web.Response:
    repository, phase = _filters(request)
    watch = request.app[WATCH]
    return render(
        request,
        "environments.html",
        rows=_rows(request),
        repository=repository,
        phase=phase,
        phases=views.PHASES,
        repositories=views.repositories(watch.objects.values()),
        listed=watch.listed,
        watch_error=watch.error,
        live_version=watch.version,
        # The rows the page fetches on each change: the same filters, rebuilt from their values only.
        query=urlencode({k: v for k, v in (("repository", repository), ("phase", phase)) if v}),
    )


async def environment_rows(request: web.Request) -> web.Response:
    """The list's rows alone, which the page fetches when the event stream says something changed."""
    return render(request, "_rows.html", rows=_rows(request))


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: `changed` with the list's version whenever an environment changes."""
    watch, closing = request.app[WATCH], request.app[CLOSING]
    response = web.StreamResponse(
        headers={**SECURITY_HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    version = watch.version
    await response.write(f"retry: 2000\nevent: changed\ndata: {version}\n\n".encode())
    while not closing.is_set():
        seen = await watch.changed(version, KEEPALIVE_SECONDS)
        if closing.is_set():
            break
        try:
            if seen != version:
                version = seen
                await response.write(f"event: changed\ndata: {version}\n\n".encode())
            else:
                await response.write(b": keepalive\n\n")
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            break
    return response


async def _in_thread(request: web.Request, call: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], call)


async def environment_page(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not views.NAME_PATTERN.fullmatch(name):
        return render(request, "missing.html", status=404, name=name)
    app = request.app
    obj = app[WATCH].objects.get(name)
    found: list[Any] = []
    records_error = None
    try:
        found = await asyncio.wait_for(history(app[ENGINE], name), READ_TIMEOUT)
    except Exception as err:  # the page still shows the cluster's side, and why the records are missing
        records_error = _reason(err)
    kube_events: list[dict[str, Any]] = []
    events_error = None
    try:
        kube_events = views.sorted_events(
            await asyncio.wait_for(_in_thread(request, lambda: app[KUBE].list_events(KIND, name)), READ_TIMEOUT)
        )
    except (KubeError, TimeoutError) as err:
        events_error = _reason(err)
    if obj is None and not found and records_error is None:
        return render(request, "missing.html", status=404, name=name)
    web_url = views.github_web_url(app[SETTINGS].github_api_url)
    now = datetime.datetime.now(datetime.UTC)
    context = views.environment_page(name, obj, web_url, now)
    return render(
        request,
        "environment.html",
        **context,
        history=found,
        records_error=records_error,
        events=kube_events,
        events_error=events_error,
    )


async def totals_page(request: web.Request) -> web.Response:
    app = request.app
    now = datetime.datetime.now(datetime.UTC)
    records_error = None
    samples: list[tuple[datetime.datetime, float]] = []
    failures: list[tuple[str, int]] = []
    try:
        samples, failures = await asyncio.wait_for(
            asyncio.gather(
                records.ready_samples(app[ENGINE], now - DAY), records.failures_by_reason(app[ENGINE], now - DAY)
            ),
            READ_TIMEOUT,
        )
    except Exception as err:  # shown on the page: the cluster's figures are still worth seeing
        records_error = _reason(err)
    return render(
        request,
        "totals.html",
        phases=views.phase_counts(app[WATCH].objects.values()),
        total=len(app[WATCH].objects),
        ready=views.ready_times(samples, now),
        failures=failures,
        records_error=records_error,
        operator=await operator_figures(app),
    )


async def operator_figures(app: web.Application) -> views.OperatorFigures:
    url = app[SETTINGS].dashboard_operator_metrics_url
    if not url:
        return views.OperatorFigures(error="not configured (EPHEMERA_DASHBOARD_OPERATOR_METRICS_URL)")
    try:
        async with app[HTTP].get(url, timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT)) as answer:
            if answer.status != 200:
                return views.OperatorFigures(error=f"the operator's metrics answered {answer.status}")
            return views.operator_figures(await answer.text())
    except (aiohttp.ClientError, TimeoutError) as err:
        return views.OperatorFigures(error=f"the operator's metrics are not reachable: {_reason(err)}")


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


async def healthz(request: web.Request) -> web.Response:
    """Healthy once the environments have been listed: before that every page would be empty."""
    watch = request.app[WATCH]
    status = 200 if watch.listed else 503
    body = {"status": "ok" if watch.listed else "listing", "environments": len(watch.objects), "error": watch.error}
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


async def _startup(app: web.Application) -> None:
    settings = app[SETTINGS]
    app[CLOSING] = asyncio.Event()
    app[EXECUTOR] = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dashboard")
    api_client = load_api_client(settings.kubeconfig, pool_size=4)
    app[KUBE] = Kube(api_client, request_timeout=READ_TIMEOUT)
    app[WATCH] = EnvironmentWatch(api_client, asyncio.get_running_loop())
    app[WATCH].start()
    app[ENGINE] = make_engine(settings.database_url)
    app[HTTP] = aiohttp.ClientSession()


async def _shutdown(app: web.Application) -> None:
    """Open event streams end first, so that the server does not wait on them."""
    app[CLOSING].set()
    app[WATCH].wake()


async def _cleanup(app: web.Application) -> None:
    app[WATCH].stop()
    await app[HTTP].close()
    await app[ENGINE].dispose()
    app[EXECUTOR].shutdown(wait=False, cancel_futures=True)
    app[KUBE].close()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[security_headers])
    app[SETTINGS] = settings
    app[TEMPLATES] = templates()
    app.router.add_get("/", environments_page)
    app.router.add_get("/rows", environment_rows)
    app.router.add_get("/events", events)
    app.router.add_get("/environments/{name}", environment_page)
    app.router.add_get("/totals", totals_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_cleanup)
    return app


def run(settings: Settings) -> None:
    app = create_app(settings)
    log.info("dashboard listening on %s:%d", settings.dashboard_host, settings.dashboard_port)
    web.run_app(
        app,
        host=settings.dashboard_host,
        port=settings.dashboard_port,
        access_log=None,
        print=None,
        shutdown_timeout=5,
    )
