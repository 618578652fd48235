"""The aiohttp webhook receiver: GitHub pull_request deliveries in, PreviewEnvironments out.

It verifies the signature before reading the JSON, answers 202 as soon as the object is written (or
the policy refused the PR), and never calls the database. It calls GitHub for one thing only: whether
the person who applied a fork's approval label may write to the repository. If the Kubernetes API (or
GitHub, for that question) cannot be reached it answers 503, so that GitHub records the failure and
the delivery can be redelivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from aiohttp import web
from github import GithubException
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from ephemera import logs
from ephemera.config import Settings
from ephemera.github.client import GitHubAuth, NoCredentials
from ephemera.github.permissions import can_write
from ephemera.intake import installations
from ephemera.intake.comments import IssueCommentEvent, Wakes, parse_issue_comment
from ephemera.intake.events import BadRequest, Signature, decode_body, parse_pull_request
from ephemera.intake.pullrequests import GitHubUnavailable, Intake, Outcome
from ephemera.intake.tombstones import Tombstones, default_namespace
from ephemera.kube import Kube, KubeError, load_api_client
from ephemera.metrics import process_registry
from ephemera.policy import REFUSALS

log = logging.getLogger("ephemera.webhook")

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
KUBE: web.AppKey[Kube] = web.AppKey("kube", Kube)
INTAKE: web.AppKey[Intake] = web.AppKey("intake", Intake)
EXECUTOR: web.AppKey[ThreadPoolExecutor] = web.AppKey("executor", ThreadPoolExecutor)
DELIVERIES: web.AppKey[OrderedDict[str, dict[str, Any]]] = web.AppKey("deliveries", OrderedDict)
SIGNING_KEY: web.AppKey[bytes | None] = web.AppKey("signing_key")
LIFECYCLE: web.AppKey[installations.Lifecycle] = web.AppKey("lifecycle", installations.Lifecycle)
WAKES: web.AppKey[Wakes] = web.AppKey("wakes", Wakes)

# An HMAC key shorter than a SHA-256 block's worth of guessing is no secret; GitHub suggests 32+
# random characters. An empty one is worst: anyone can sign with it.
MIN_SECRET_BYTES = 16
# Metric labels come from fixed sets, never from what a caller sends: an unauthenticated caller
# must not be able to add series to /metrics.
EVENT_LABELS = frozenset({"pull_request", "ping", "issue_comment"}) | installations.EVENTS
ACTION_LABELS = (
    frozenset(
        {
            "assigned",
            "auto_merge_disabled",
            "auto_merge_enabled",
            "closed",
            "converted_to_draft",
            "demilestoned",
            "dequeued",
            "edited",
            "enqueued",
            "labeled",
            "locked",
            "milestoned",
            "opened",
            "ready_for_review",
            "reopened",
            "review_request_removed",
            "review_requested",
            "synchronize",
            "unassigned",
            "unlabeled",
            "unlocked",
        }
    )
    | installations.ACTIONS
)


def event_label(event: str) -> str:
    return event if event in EVENT_LABELS else "other"


def action_label(action: str) -> str:
    return action if action in ACTION_LABELS or action == "-" else "other"


class InFlight:
    """How many bodies are being received; more than `limit` at once are turned away.

    Only the event loop's thread touches it, so it needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def enter(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


IN_FLIGHT: web.AppKey[InFlight] = web.AppKey("in_flight", InFlight)


# What the webhook did with a delivery: the intake's actions, its own answers, and the 4xx statuses
# of a refused one. Anything else is counted as `other` (a new refusal should be added here).
OUTCOME_LABELS = frozenset(
    {"created", "updated", "deleted", "ignored", "pong", "duplicate", "busy", "unavailable", "rejected", "error"}
    | {"refused"}  # the policy admits no preview for the PR (ephemera/policy.py)
    | {"marked", "unmarked", "renamed"}  # installation and repository events (ephemera/intake/installations.py)
    | {f"http_{status}" for status in (400, 401, 408, 413, 415, 422)}
)


# The outcomes answered 5xx: busy and unavailable 503, error 500 (an exception). The chart's alert on
# webhook 5xx (EphemeraWebhookErrors) counts these; tests/test_monitoring.py holds it to this set.
SERVER_ERROR_OUTCOMES = frozenset({"busy", "unavailable", "error"})


def outcome_label(outcome: str) -> str:
    return outcome if outcome in OUTCOME_LABELS else "other"


class Metrics:
    """The webhook's /metrics: its own series, with labels from fixed sets, beside the process's."""

    def __init__(self) -> None:
        self.registry = process_registry()
        self.events = Counter(
            "ephemera_webhook_events",
            "Webhook deliveries by event, action and outcome.",
            ["event", "action", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ephemera_webhook_latency_seconds",
            "Time from request to answer.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5),
            registry=self.registry,
        )
        self.refusals = Counter(
            "ephemera_webhook_policy_refusals",
            "pull_request events the policy refused (no environment, or the existing one deleted), by rule.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSALS:
            self.refusals.labels(reason)

    def refused(self, reason: str) -> None:
        """Count a refusal; the reason is one of policy.REFUSALS (anything else would be a bug: `other`)."""
        self.refusals.labels(reason if reason in REFUSALS else "other").inc()

    def delivery(self, event: str, action: str, outcome: str, seconds: float) -> None:
        """Count one delivery and its time to answer; every label is mapped into its fixed set."""
        self.events.labels(event_label(event), action_label(action), outcome_label(outcome)).inc()
        self.latency.observe(seconds)


METRICS_OBJ: web.AppKey[Metrics] = web.AppKey("metrics_obj", Metrics)


def error(status: int, err: str, detail: str) -> web.Response:
    return web.json_response({"error": err, "detail": detail}, status=status)


async def _read_body(request: web.Request, limit: int, seconds: float, signature: Signature | None) -> bytes:
    """The raw body, refusing one over `limit` bytes or one that takes longer than `seconds`; each
    chunk goes into `signature` as it arrives."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(413, "body too large", f"{request.content_length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            while chunk := await request.content.read(65536):
                size += len(chunk)
                if size > limit:
                    raise BadRequest(413, "body too large", f"more than {limit} bytes")
                if signature is not None:
                    signature.update(chunk)
                chunks.append(chunk)
    except TimeoutError as err:
        raise BadRequest(408, "request timeout", f"the body did not arrive within {seconds:.0f} s") from err
    except ConnectionResetError as err:
        # The caller went away mid-body: a refusal like any other, not an error with a traceback.
        raise BadRequest(400, "incomplete body", "the connection closed before the body was complete") from err
    return b"".join(chunks)


def _busy(limit: int) -> web.Response:
    response = error(503, "busy", f"{limit} deliveries are being received already; redeliver the event later")
    response.headers["Retry-After"] = "1"
    # The body was not read: close the connection rather than let aiohttp drain it.
    response.force_close()
    return response


async def webhook(request: web.Request) -> web.Response:
    started = time.perf_counter()
    app = request.app
    settings = app[SETTINGS]
    metrics = app[METRICS_OBJ]
    event = request.headers.get("X-GitHub-Event", "")
    delivery = request.headers.get("X-GitHub-Delivery", "")
    action = "-"
    outcome = "error"
    in_flight = app[IN_FLIGHT]
    try:
        if not in_flight.enter():
            outcome = "busy"
            return _busy(in_flight.limit)
        try:
            key = app[SIGNING_KEY]
            signature = Signature(key) if key is not None else None
            body = await _read_body(request, settings.webhook_max_body_bytes, settings.webhook_body_timeout, signature)
            if signature is not None and not signature.matches(request.headers.get("X-Hub-Signature-256")):
                raise BadRequest(401, "invalid signature", "X-Hub-Signature-256 is missing or does not match the body")
            if not event or len(event) > 64:
                raise BadRequest(400, "missing event", "the X-GitHub-Event header is required")
            if len(delivery) > 128:
                raise BadRequest(400, "invalid delivery id", "X-GitHub-Delivery is too long")
            data = decode_body(body, request.headers.get("Content-Type", ""))
            if event == "ping":
                outcome = "pong"
                return web.json_response({"result": "pong"}, status=200)
            if event in installations.EVENTS:
                lifecycle_event = installations.parse(event, data)
                del body, data
            elif event == "issue_comment":
                comment = parse_issue_comment(data)
                del body, data
            elif event != "pull_request":
                outcome = "ignored"
                return web.json_response({"result": "ignored", "reason": f"event {event!r} is not handled"}, status=202)
            else:
                parsed = parse_pull_request(data)
                # The body and its JSON are not needed past here: free them before the slot is.
                del body, data
        finally:
            in_flight.leave()
        if event in installations.EVENTS:
            action = lifecycle_event.action
            outcome = await _lifecycle(app, event, lifecycle_event, delivery)
            return (
                web.json_response({"result": outcome}, status=202)
                if outcome not in ERROR_OUTCOMES
                else _failed(outcome)
            )
        if event == "issue_comment":
            action = comment.action
            outcome, response = await _comment(app, comment, delivery)
            return response
        action = parsed.action
        extra = {"delivery": delivery, "repository": parsed.repo, "pr": parsed.pr, "action": action}
        seen = app[DELIVERIES].get(delivery) if delivery else None
        if seen is not None:
            outcome = "duplicate"
            log.info("redelivery ignored", extra=extra)
            return web.json_response({**seen, "result": "ignored", "reason": "delivery already handled"}, status=202)
        loop = asyncio.get_running_loop()
        try:
            result: Outcome = await loop.run_in_executor(app[EXECUTOR], app[INTAKE].handle, parsed, delivery)
        except GitHubUnavailable as err:
            outcome = "unavailable"
            log.warning("GitHub unavailable: %s", err, extra=extra)
            return error(503, "github unavailable", f"{err}; redeliver the event later")
        except KubeError as err:
            if err.temporary:
                outcome = "unavailable"
                log.warning("Kubernetes API unavailable: %s", err, extra=extra)
                return error(503, "kubernetes unavailable", f"{err}; redeliver the event later")
            outcome = "rejected"
            log.error("Kubernetes refused the change: %s", err, extra=extra)
            return error(422, "rejected by kubernetes", str(err))
        outcome = result.action
        if result.policy is not None:
            metrics.refused(result.policy)
        answer = result.as_json()
        if delivery:
            _remember(app[DELIVERIES], delivery, answer, settings.webhook_delivery_cache)
        about = logs.about(result.name) if result.name else {}
        log.info("%s %s", result.action, result.reason, extra={**extra, **about})
        return web.json_response(answer, status=202)
    except BadRequest as err:
        outcome = f"http_{err.status}"
        log.info("refused: %s (%s)", err.error, err.detail, extra={"delivery": delivery[:128], "event": event[:64]})
        return error(err.status, err.error, err.detail)
    finally:
        metrics.delivery(event, action, outcome, time.perf_counter() - started)


ERROR_OUTCOMES = frozenset({"unavailable", "rejected"})


def _failed(outcome: str) -> web.Response:
    if outcome == "unavailable":
        return error(503, "kubernetes unavailable", "the Kubernetes API cannot be reached; redeliver the event later")
    return error(422, "rejected by kubernetes", "see the webhook's logs")


async def _lifecycle(
    app: web.Application,
    event: str,
    parsed: installations.InstallationEvent | installations.RepositoriesEvent | installations.RepositoryEvent,
    delivery: str,
) -> str:
    """Apply an installation, installation_repositories or repository event; the outcome's name."""
    extra = {"delivery": delivery, "event": event, "action": parsed.action}
    loop = asyncio.get_running_loop()
    try:
        result: Outcome = await loop.run_in_executor(app[EXECUTOR], app[LIFECYCLE].handle, parsed)
    except KubeError as err:
        log.warning("%s %s not applied: %s", event, parsed.action, err, extra=extra)
        return "unavailable" if err.temporary else "rejected"
    log.info("%s %s", result.action, result.reason, extra=extra)
    return result.action


async def _comment(app: web.Application, comment: IssueCommentEvent, delivery: str) -> tuple[str, web.Response]:
    """Apply an issue_comment (`/preview wake`); the outcome's name and the answer."""
    repository, pr = comment.repository.full_name, comment.issue.number
    extra = {"delivery": delivery, "repository": repository, "pr": pr, "action": comment.action}
    loop = asyncio.get_running_loop()
    try:
        result: Outcome = await loop.run_in_executor(app[EXECUTOR], app[WAKES].handle, comment)
    except KubeError as err:
        log.warning("wake not applied: %s", err, extra=extra)
        if err.temporary:
            return "unavailable", error(503, "kubernetes unavailable", f"{err}; redeliver the event later")
        return "rejected", error(422, "rejected by kubernetes", str(err))
    except NoCredentials as err:
        log.error("wake not applied: %s", err, extra=extra)
        reason = f"the webhook cannot check who may wake ({err}); configure the GitHub App or a token"
        return "ignored", web.json_response({"result": "ignored", "name": None, "reason": reason}, status=202)
    except (GithubException, requests.RequestException) as err:
        # Who may write is unknown: never taken for a no. GitHub records the failure, and the
        # backstop redelivers it.
        log.warning(
            "cannot tell whether %s may write to %s: %s", comment.comment.user.login, repository, err, extra=extra
        )
        return "unavailable", error(503, "github unavailable", "the commenter's permission could not be checked")
    log.info("%s %s", result.action, result.reason, extra={**extra, "environment": result.name})
    return result.action, web.json_response(result.as_json(), status=202)


def _remember(cache: OrderedDict[str, dict[str, Any]], delivery: str, answer: dict[str, Any], size: int) -> None:
    cache[delivery] = answer
    while len(cache) > size:
        cache.popitem(last=False)


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the Kubernetes API answers."""
    app = request.app
    try:
        await asyncio.get_running_loop().run_in_executor(app[EXECUTOR], app[KUBE].get_environment, "readyz-probe")
    except KubeError as err:
        return error(503, "kubernetes unavailable", str(err))
    return web.json_response({"status": "ready"})


async def metrics_view(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(request.app[METRICS_OBJ].registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error answer is JSON, including aiohttp's own (404, 405) and unexpected failures."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason, exc.text or exc.reason)
    except Exception:
        log.exception("unexpected error")
        return error(500, "internal error", "see the webhook's logs")


def signing_key(settings: Settings) -> bytes | None:
    """The HMAC key deliveries must be signed with; None (unsigned accepted) only in development.

    Refuses (SystemExit) a missing, empty or short secret unless EPHEMERA_WEBHOOK_INSECURE_NO_SECRET is set.
    """
    secret = settings.webhook_secret.get_secret_value().encode() if settings.webhook_secret is not None else None
    if secret is not None and len(secret) >= MIN_SECRET_BYTES:
        return secret
    if settings.webhook_secret is None:
        problem = "EPHEMERA_WEBHOOK_SECRET is not set: refusing to accept unsigned webhooks."
    elif not secret:
        problem = "EPHEMERA_WEBHOOK_SECRET is empty: anyone can sign a webhook with an empty key."
    else:
        problem = f"EPHEMERA_WEBHOOK_SECRET is {len(secret)} bytes: at least {MIN_SECRET_BYTES} are required."
    if not settings.webhook_insecure_no_secret:
        raise SystemExit(
            f"{problem} Set it to the GitHub App's webhook secret (32 or more random characters), or "
            "EPHEMERA_WEBHOOK_INSECURE_NO_SECRET=true for local development only."
        )
    log.warning("%s Accepted because EPHEMERA_WEBHOOK_INSECURE_NO_SECRET is set: development only.", problem)
    return secret or None


def create_app(settings: Settings, kube: Kube | None = None) -> web.Application:
    """The aiohttp application; `kube` defaults to one built from the settings at start-up."""
    key = signing_key(settings)
    # Bodies are read by hand with our own limit; aiohttp's must not refuse them first.
    app = web.Application(client_max_size=settings.webhook_max_body_bytes + 1, middlewares=[json_errors])
    app[SETTINGS] = settings
    app[SIGNING_KEY] = key
    app[DELIVERIES] = OrderedDict()
    app[METRICS_OBJ] = Metrics()
    app[IN_FLIGHT] = InFlight(settings.webhook_max_in_flight)
    app.router.add_post("/webhook", webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)

    async def lifecycle(app: web.Application) -> Any:
        client = kube or Kube(await asyncio.to_thread(load_api_client, settings.kubeconfig, 64), request_timeout=10.0)
        app[KUBE] = client
        app[EXECUTOR] = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kube")
        tombstones = Tombstones(
            client,
            namespace=settings.webhook_namespace or default_namespace(),
            retention=settings.webhook_tombstone_retention,
        )
        # GitHub is asked only whether the labeller of a fork's approval may write (nothing else).
        auth = await asyncio.to_thread(GitHubAuth, settings)
        app[INTAKE] = Intake.from_settings(settings, client, tombstones, auth)
        # What each event's guards read, kept from a watch instead (EPHEMERA_WEBHOOK_MIRROR): they
        # answer from the API server, as before, until their first list has arrived.
        mirrors = [tombstones.mirrored(), app[INTAKE].mirrored()] if settings.webhook_mirror else []
        for mirror in mirrors:
            mirror.start()
        app[LIFECYCLE] = installations.Lifecycle(client, grace=settings.backstop_teardown_grace)

        def writer(repository: str, login: str, installation: int | None) -> bool:
            return can_write(lambda _: auth.client_for(installation), repository, login)

        app[WAKES] = Wakes(client, writer, prefix=settings.namespace_prefix)
        yield
        for mirror in mirrors:
            mirror.stop()
        app[EXECUTOR].shutdown(wait=True)
        if kube is None:
            client.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def run(settings: Settings) -> None:
    app = create_app(settings)
    log.info("webhook listening on %s:%d", settings.webhook_host, settings.webhook_port)
    web.run_app(app, host=settings.webhook_host, port=settings.webhook_port, access_log=None, print=None)
