"""Timers and periodic jobs in place of Celery Beat.

- Per object, only where it is cheap: a retry timer runs for Failed, retriable objects alone.
- For the whole operator, one task each: the sweep (stale, lost namespaces, orphans), the purge of
  old records, the records resync, and the phase gauge.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from ephemera.environments import Environments, PermanentFailure
from ephemera.models import GROUP, PLURAL, VERSION, Phase
from ephemera.naming import RETRY_ANNOTATION
from ephemera.operator.metrics import ENVIRONMENTS, RECONCILES
from ephemera.sweeps import Seen, Sweeper, retry, retry_due

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, PLURAL)
RETRY_CHECK_INTERVAL = 2.0


def _retriable(status: kopf.Status, meta: kopf.Meta, **_: Any) -> bool:
    return (
        status.get("phase") == Phase.FAILED.value and not status.get("permanent") and not meta.get("deletionTimestamp")
    )


@kopf.timer(*RESOURCE, id="retry", interval=RETRY_CHECK_INTERVAL, when=_retriable)
def retry_failed(*, body: kopf.Body, status: kopf.Status, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Provision a recent, retriable failure again once its backoff has passed (capped in attempts)."""
    if not retry_due(dict(status), memo.settings):
        return
    RECONCILES.labels("retry", "attempt").inc()
    try:
        retry(memo.environments, dict(body), manual=None, logger=logger)
    except PermanentFailure as failure:  # the object's spec no longer validates
        logger.error("%s", failure.message)


@kopf.on.field(*RESOURCE, id="manual-retry", field=("metadata", "annotations", RETRY_ANNOTATION))
def manual_retry(
    *, body: kopf.Body, new: Any, status: kopf.Status, meta: kopf.Meta, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """`kubectl annotate pe NAME ephemera.dev/retry=<anything new> --overwrite` (or `ephemera environments retry`)."""
    if not new or new == status.get("retryRequest") or meta.get("deletionTimestamp"):
        return
    if status.get("phase") not in (Phase.FAILED.value, Phase.READY.value):
        return  # under way already: the running handler will settle it
    service: Environments = memo.environments
    retry(service, dict(body), manual=str(new), logger=logger)


async def _every(seconds: float, job: Callable[[], Awaitable[None]], name: str) -> None:
    while True:
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic job %s failed; trying again in %.0f s", name, seconds)
        await asyncio.sleep(seconds)


def start(memo: kopf.Memo) -> list[asyncio.Task[None]]:
    """Start the operator-wide jobs; they stop with the operator."""
    cfg = memo.settings
    sweeper = Sweeper(memo.environments)

    async def sweep() -> None:
        seen: dict[str, Seen] = dict(memo.phases)
        report = await asyncio.to_thread(sweeper.sweep, seen)
        if report:
            log.info("sweep: %s", report)

    async def purge() -> None:
        purged = await memo.records.purge(datetime.timedelta(seconds=cfg.record_retention), cfg.purge_batch)
        if purged:
            log.info("purged %d destroyed environment record(s) older than %.0f s", purged, cfg.record_retention)

    async def resync() -> None:
        await memo.records.resync()

    async def gauge() -> None:
        counts: dict[str, int] = {}
        for seen in list(memo.phases.values()):
            counts[seen.phase] = counts.get(seen.phase, 0) + 1
        for phase in Phase:
            ENVIRONMENTS.labels(phase.value).set(counts.get(phase.value, 0))

    jobs = [
        (cfg.sweep_interval, sweep, "sweep"),
        (cfg.purge_interval, purge, "purge"),
        (cfg.resync_interval, resync, "resync"),
        (10.0, gauge, "phase-gauge"),
    ]
    return [asyncio.create_task(_every(seconds, job, name), name=name) for seconds, job, name in jobs]
