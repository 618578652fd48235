"""The retries of Failed environments: the automatic ones (a window, a cap on attempts, and a
full-jitter backoff between them) and the one a person asks for (the `ephemera.dev/retry`
annotation). The periodic job (operator/jobs.py) calls `retry_due_ones`; the manual-retry handler
(operator/lifecycle.py) calls `retry`.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Mapping
from typing import Any

from ephemera import backoff
from ephemera.api.models import Phase, PreviewEnvironmentStatus, now_iso, parse_time
from ephemera.api.naming import RETRY_ANNOTATION
from ephemera.config import Settings
from ephemera.environments import Environment, Environments, Failure, PermanentFailure
from ephemera.kube import Obj
from ephemera.watchcache import Seen


def retry_due_ones(service: Environments, seen: dict[str, Seen], logger: Any) -> int:
    """Retry every Failed, retriable object whose backoff has passed; how many were retried."""
    retried = 0
    for name, item in list(seen.items()):
        if item.deleting or not retry_due(item.retry_status(), service.settings, item.uid):
            continue
        body = service.kube.get_environment(name)
        if body is None or body["metadata"]["uid"] != item.uid:
            continue  # gone, or another object of that name
        if not service.settings.shard_handles(body["metadata"].get("labels")):
            continue  # moved to another shard since the watch told us of it: that one retries it
        if not retry_due(dict(body.get("status") or {}), service.settings, item.uid):
            continue  # changed since the watch last told us
        retry(service, body, manual=None, logger=logger)
        retried += 1
    return retried


def retried_later(status: Mapping[str, Any], settings: Settings, now: datetime.datetime | None = None) -> bool:
    """Whether the automatic retries will provision this Failed environment again, once its backoff
    has passed: not a permanent failure, attempts left, and within the window."""
    if status.get("phase") != Phase.FAILED.value or status.get("permanent"):
        return False
    failed_at = parse_time(status.get("failedAt"))
    if failed_at is None or int(status.get("retries") or 0) >= settings.retry_max_attempts:
        return False
    now = now or datetime.datetime.now(datetime.UTC)
    return (now - failed_at).total_seconds() <= settings.retry_window


def taken_over(status: PreviewEnvironmentStatus, began: datetime.datetime) -> bool:
    """Whether a handler that began trying at `began` finds its attempt taken from it: the object was
    failed by another actor since (the stale sweep, a template's rollout, the admission), and the
    automatic retries own a Failed object from then on: its phase is Failed, or Provisioning under one
    of their attempts, with a `failedAt` from after the handler began (the handler's own transitions
    never set one; its own permanent failure ends it). Checked by time, not reason: once the retry job
    has tried, the reason is its attempt's (NamespaceTerminating), no longer the sweep's Stale."""
    if status.phase is Phase.FAILED and status.reason == "Stale":
        return True
    failed_at = parse_time(status.failed_at)
    return status.phase in (Phase.FAILED, Phase.PROVISIONING) and failed_at is not None and failed_at >= began


def retry_due(status: Mapping[str, Any], settings: Settings, uid: str, now: datetime.datetime | None = None) -> bool:
    """Whether the Failed environment with `uid` is due an automatic retry now (window, attempts and backoff)."""
    now = now or datetime.datetime.now(datetime.UTC)
    failed_at = parse_time(status.get("failedAt"))
    if failed_at is None or not retried_later(status, settings, now):
        return False
    attempts = int(status.get("retries") or 0)
    age = (now - failed_at).total_seconds()
    # The jitter is drawn from the object and its failure, not afresh at each check: every check of
    # one failure (and every replica, and a restarted operator) agrees on when it is due, while
    # objects that failed together are retried spread out. The window bounds the wait: an attempt
    # still allowed is never drawn past it.
    rng = random.Random(f"{uid}/{status.get('failedAt')}/{attempts}")
    return age >= backoff.delay(attempts, settings.retry_backoff, settings.retry_window, rng)


def retry_requested(body: Mapping[str, Any]) -> str | None:
    """The retry a person asked for (the `ephemera.dev/retry` annotation's value) that is not handled
    yet, or None: no request, the one the status says was handled, or an object being deleted."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    request = (meta.get("annotations") or {}).get(RETRY_ANNOTATION)
    if not request or request == status.get("retryRequest") or meta.get("deletionTimestamp"):
        return None
    return str(request)


def retry(service: Environments, body: Obj, *, manual: str | None, logger: Any) -> None:
    """Provision a Failed environment again, counting the attempt; a manual retry resets the count."""
    env = Environment.from_body(body)
    attempts = 0 if manual is not None else int(env.status.retries or 0) + 1
    extra: dict[str, Any] = {"retries": attempts}
    if manual is not None:
        extra["retryRequest"] = manual
    if manual is not None:
        reason, message = "ManualRetry", "Retry requested through the ephemera.dev/retry annotation"
    else:
        reason, message = "Retry", f"Automatic retry {attempts} of {service.settings.retry_max_attempts}"
    env = service.transition(env, Phase.PROVISIONING, reason, message, extra, logger)
    try:
        service.provision(env, updating=False, logger=logger)
    except PermanentFailure as failure:
        service.fail(env, failure, logger)
    except Failure as failure:
        # Counted as a failed attempt; the next one waits for the backoff.
        service.transition(
            env, Phase.FAILED, failure.reason, failure.message, {"failedAt": now_iso(), "permanent": False}, logger
        )
