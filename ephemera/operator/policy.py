"""kopf side of the lifecycle policy: the ledger's watch, `/preview wake`, and the periodic rounds
of admission (the queue) and expiry, run by the active replica among the operator's jobs."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import kopf
from prometheus_client import Gauge

from ephemera.admission import activity
from ephemera.api.models import RESOURCE, Phase
from ephemera.api.naming import WAKE_ANNOTATION
from ephemera.environments import Environment, PermanentFailure
from ephemera.kube import KubeError
from ephemera.ledger import LIVE
from ephemera.metrics import REGISTRY
from ephemera.operator.runtime import Runtime

log = logging.getLogger(__name__)

IN_FLIGHT = Gauge(
    "ephemera_provisions_in_flight",
    "Environments being provisioned now (at most EPHEMERA_POLICY_MAX_PROVISIONS_IN_FLIGHT when set).",
    registry=REGISTRY,
)
QUEUED = Gauge("ephemera_queue_length", "Environments waiting in phase Queued.", registry=REGISTRY)
LIVE_ENVIRONMENTS = Gauge(
    "ephemera_live_environments",
    "Environments that hold or are getting a namespace (what the caps count).",
    registry=REGISTRY,
)


@kopf.on.event(*RESOURCE, id="policy-ledger")
async def observe(*, event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Keep the ledger current: what the caps, the queue and the expiry are decided from."""
    obj = event.get("object")
    if isinstance(obj, dict):
        runtime: Runtime = memo.runtime
        runtime.ledger.observe(event.get("type"), dict(obj))
        if event.get("type") != "DELETED":
            # This handler may run before lifecycle's `track` (registration follows import order): kopf's
            # line about it names the object's PR all the same.
            spec = obj.get("spec") or {}
            runtime.subjects.remember(obj["metadata"]["name"], spec.get("repository"), spec.get("pullRequest"))


def _wake_requested(body: kopf.Body, **_: Any) -> bool:
    meta, status = body.get("metadata", {}), body.get("status") or {}
    new = (meta.get("annotations") or {}).get(WAKE_ANNOTATION)
    return bool(new) and new != status.get("wakeRequest") and not meta.get("deletionTimestamp")


@kopf.on.event(*RESOURCE, id="wake", when=_wake_requested)
def wake(*, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """`/preview wake` (the webhook sets ephemera.dev/wake): an Expired environment comes back through
    the admission; a live one starts its TTL again. Each wake is acted on once (status.wakeRequest)."""
    value = str((body.get("metadata", {}).get("annotations") or {}).get(WAKE_ANNOTATION))
    try:
        env = Environment.from_body(dict(body))
    except PermanentFailure:
        return  # an invalid spec: its Failed status says why
    runtime: Runtime = memo.runtime
    admission, service = runtime.admission, runtime.environments
    now = datetime.datetime.now(datetime.UTC)
    phase = env.status.phase.value if env.status.phase else None
    if phase in LIVE:
        fields = activity(env, admission.entry(env), admission.ttl_of(env.spec.repository), now, force=True)
        service.kube.patch_environment_status(env.name, {**fields, "wakeRequest": value})
        logger.info("Woken: its TTL starts again")
        return
    if env.status.phase is not Phase.EXPIRED:
        service.kube.patch_environment_status(env.name, {"wakeRequest": value})  # Queued: it is coming
        return
    # Recorded with its first new status (Queued or Provisioning): a wake that could not even write
    # that is taken up again on the object's next event.
    admission.provision(env, updating=False, logger=logger, extra={"wakeRequest": value}, detached=True)


def jobs(runtime: Runtime) -> list[tuple[float, Callable[[], Coroutine[Any, Any, None]], str]]:
    """The policy's periodic rounds (interval, job, name), for the operator's jobs loop."""
    admission, expiry, ledger = runtime.admission, runtime.expiry, runtime.ledger
    interval = runtime.settings.policy_interval

    async def admit() -> None:
        starting, moves = admission.round()
        if starting:
            await asyncio.gather(*(asyncio.to_thread(admission.admit, entry) for entry in starting))
            log.info("admitted %d queued environment(s)", len(starting))
        for name, position in moves:
            try:
                await asyncio.to_thread(admission.write_position, name, position)
            except KubeError as err:
                log.warning("could not write the queue position of %s: %s", name, err)

    async def expire() -> None:
        expiring, refresh = expiry.round()
        for entry in expiring:
            if await asyncio.to_thread(expiry.expire, entry):
                log.info("expired %s", entry.name, extra={"repository": entry.repository})
        await asyncio.to_thread(expiry.finish)
        for name, value in refresh:
            try:
                await asyncio.to_thread(expiry.refresh, name, value)
            except KubeError as err:
                log.warning("could not write the expiry of %s: %s", name, err)

    async def resync() -> None:
        started = time.monotonic()
        # The listing is read page by page into the ledger's small entries, never held whole (with
        # 20,000 environments a whole one is some 80 MB), and off the event loop.
        dropped = await asyncio.to_thread(ledger.resync, runtime.kube.list_environments(), started)
        if dropped:
            log.info("policy ledger: %d environment(s) gone unseen were dropped", dropped)

    async def gauges() -> None:
        counts = ledger.counts()
        IN_FLIGHT.set(counts.in_flight)
        LIVE_ENVIRONMENTS.set(counts.live)
        QUEUED.set(len(ledger.queue()))

    return [
        (interval, admit, "admission"),
        (interval, expire, "expiry"),
        (min(interval, 10.0), gauges, "policy-gauges"),
        # A standby's watch is paused: what was deleted meanwhile is never told; one listing mends it.
        (runtime.settings.resync_interval, resync, "policy-ledger-resync"),
    ]
