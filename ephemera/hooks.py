"""Result hooks: a CloudEvent to each configured HTTP target on every transition.

Each transition becomes one CloudEvents 1.0 event in structured mode (`application/cloudevents+json`),
signed like GitHub signs its webhooks: `X-Ephemera-Signature-256: sha256=<HMAC-SHA256 of the body
under EPHEMERA_HOOK_SECRET>`. The listener only queues (a reconcile never waits for a target). Each
target gets one environment's events in the order they happened, one at a time; a failed request is
retried with backoff and the same body (the event's id does not change), and after
EPHEMERA_HOOK_MAX_ATTEMPTS the event is dropped for that target, logged and counted, and the next one
goes. Targets are independent: a dead one delays nobody else's events.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client import Counter

from ephemera import __version__, backoff, logs
from ephemera.api.models import GROUP, PLURAL, VERSION
from ephemera.config import Settings
from ephemera.metrics import REGISTRY
from ephemera.transitions import Transition

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Ephemera-Signature-256"
CONTENT_TYPE = "application/cloudevents+json"
TYPE_PREFIX = "dev.ephemera.environment."
# Requests in flight at once, over all targets: a burst of transitions does not open a thousand sockets.
CONCURRENCY = 16
# What a target's answer means: 2xx delivered; these are worth another try; any other is a refusal.
RETRIABLE = frozenset({408, 425, 429})

OUTCOMES = ("delivered", "retried", "refused", "dropped", "overflow")
DELIVERIES = Counter(
    "ephemera_hook_deliveries",
    "Result hook deliveries by outcome: delivered; retried (an attempt failed); refused (a 4xx, not retried); "
    "dropped (EPHEMERA_HOOK_MAX_ATTEMPTS failed, or no EPHEMERA_HOOK_SECRET to sign with); overflow "
    "(EPHEMERA_HOOK_QUEUE_LIMIT reached).",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in OUTCOMES:
    DELIVERIES.labels(_outcome)


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: `sha256=` and the hex HMAC-SHA256 of the body, as GitHub's."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def event_id(t: Transition) -> str:
    """Unique per transition, and the same for every attempt at delivering it."""
    key = f"{t.uid}|{t.old_phase}|{t.phase}|{t.occurred.isoformat()}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def cloud_event(t: Transition) -> dict[str, Any]:
    """The CloudEvent (1.0, structured mode) that announces `t`."""
    repository, pull_request = t.spec.get("repository"), t.spec.get("pullRequest")
    return {
        "specversion": "1.0",
        "type": TYPE_PREFIX + t.phase.lower(),
        "source": f"/apis/{GROUP}/{VERSION}/{PLURAL}/{t.name}",
        "id": event_id(t),
        "time": t.occurred.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "subject": f"{repository}#{pull_request}",
        "datacontenttype": "application/json",
        "data": {
            "name": t.name,
            "phase": t.phase,
            "previousPhase": t.old_phase,
            "reason": t.reason,
            "message": t.message,
            "url": t.status.get("url"),
            "commit": t.spec.get("commitSha"),
            "repository": repository,
            "pullRequest": pull_request,
        },
    }


class _Event:
    __slots__ = ("about", "body", "id", "name", "type")

    def __init__(self, t: Transition) -> None:
        event = cloud_event(t)
        self.id: str = event["id"]
        self.type: str = event["type"]
        self.name = t.name
        self.about = logs.about(t.name, event["data"]["repository"], event["data"]["pullRequest"])
        self.body = json.dumps(event, separators=(",", ":")).encode()


Targets = Callable[[Transition], list[str]]


class Hooks:
    """The queues (one per target and environment) and the senders that drain them, on the operator's loop."""

    def __init__(self, settings: Settings, targets: Targets) -> None:
        self.settings = settings
        self.targets = targets
        secret = settings.hook_secret
        self._secret = secret.get_secret_value().encode() if secret is not None else None
        self._queues: dict[tuple[str, str], collections.deque[_Event]] = {}
        self._senders: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._queued = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._said_unsigned = False

    # Called from handler threads (or the loop): never waits ------------------------------------------

    def listener(self, transition: Transition) -> None:
        if self._loop is None:
            return
        urls = self.targets(transition)
        if urls:
            self._loop.call_soon_threadsafe(self._arrive, transition, urls)

    def _arrive(self, transition: Transition, urls: list[str]) -> None:
        event = _Event(transition)
        if self._secret is None:
            # Settings' hook URLs need a secret (checked at start); a template's hooks are never sent unsigned.
            DELIVERIES.labels("dropped").inc(len(urls))
            if not self._said_unsigned:
                self._said_unsigned = True
                log.error("result hooks not sent: EPHEMERA_HOOK_SECRET is not set (hooks are always signed)")
            return
        for url in urls:
            if self._queued >= self.settings.hook_queue_limit:
                DELIVERIES.labels("overflow").inc()
                log.error(
                    "result hook %s for %s to %s dropped: %d events queued (EPHEMERA_HOOK_QUEUE_LIMIT)",
                    event.type,
                    event.name,
                    url,
                    self._queued,
                    extra=event.about,
                )
                continue
            key = (url, transition.uid)
            self._queues.setdefault(key, collections.deque()).append(event)
            self._queued += 1
            if key not in self._senders:
                self._senders[key] = asyncio.create_task(self._send_all(key), name=f"hooks {transition.name}")

    # The loop ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.hook_timeout),
            headers={"User-Agent": f"ephemera/{__version__}", "Content-Type": CONTENT_TYPE},
        )

    async def stop(self) -> None:
        """Events still queued are lost with the process (hooks are notifications, not the record)."""
        self._loop = None
        senders = list(self._senders.values())
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def pending(self) -> int:
        """Events queued or being sent, over all targets."""
        return self._queued

    async def _send_all(self, key: tuple[str, str]) -> None:
        """Deliver one target's events of one environment, in order, each until delivered or given up."""
        url, _ = key
        queue = self._queues[key]
        try:
            while queue:
                await self._deliver(url, queue[0])
                queue.popleft()
                self._queued -= 1
        finally:
            self._queued -= len(queue)
            del self._queues[key]
            del self._senders[key]

    async def _deliver(self, url: str, event: _Event) -> None:
        assert self._session is not None
        assert self._secret is not None
        headers = {SIGNATURE_HEADER: sign(self._secret, event.body)}
        attempts = self.settings.hook_max_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with (
                    self._slots,
                    self._session.post(url, data=event.body, headers=headers, allow_redirects=False) as answer,
                ):
                    status = answer.status
                why = f"HTTP {status}"
            except (aiohttp.ClientError, TimeoutError) as err:
                status, why = None, str(err) or type(err).__name__
            if status is not None and 200 <= status <= 299:
                DELIVERIES.labels("delivered").inc()
                return
            if status is not None and status < 500 and status not in RETRIABLE:
                DELIVERIES.labels("refused").inc()
                log.error(
                    "result hook %s for %s refused by %s (%s); not retried",
                    event.type,
                    event.name,
                    url,
                    why,
                    extra=event.about,
                )
                return
            if attempt == attempts:
                break
            DELIVERIES.labels("retried").inc()
            wait = backoff.delay(attempt - 1, self.settings.hook_retry_backoff, self.settings.hook_retry_max_delay)
            log.warning(
                "result hook %s for %s to %s failed (%s); attempt %d of %d in %.1f s",
                event.type,
                event.name,
                url,
                why,
                attempt + 1,
                attempts,
                wait,
                extra=event.about,
            )
            await asyncio.sleep(wait)
        DELIVERIES.labels("dropped").inc()
        log.error(
            "result hook %s for %s dropped for %s after %d failed attempts (EPHEMERA_HOOK_MAX_ATTEMPTS); last: %s",
            event.type,
            event.name,
            url,
            attempts,
            why,
            extra=event.about,
        )
