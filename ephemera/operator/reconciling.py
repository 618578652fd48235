"""The error policy around the lifecycle handlers, in one place: the handlers only say what to call.

`reconciling` parses the object and turns what the service raises into kopf's answer, the object's
status, a metric and an Event:
- a spec that cannot work: Failed for good (kopf stops);
- a permanent Failure: Failed, with its reason (kopf stops);
- a temporary one: kopf tries again after a full-jitter backoff (or after the failure's own delay
  when it is plain waiting, which also posts no Event each poll);
- past EPHEMERA_SOFT_TIME_LIMIT one Warning; past EPHEMERA_HARD_TIME_LIMIT Failed for good;
- a retry of an attempt the stale sweep has failed meanwhile stops: the retry job owns it.
A teardown has no time limit and is never handed over: kopf releases the finalizer when its delete
handler stops, so it must stop only once the namespace is gone (`awaiting_teardown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import kopf

from ephemera import backoff
from ephemera.environments import Environment, Environments, Failure, PermanentFailure, Terminating
from ephemera.kube import KubeError
from ephemera.operator.metrics import handling, reconciled
from ephemera.operator.runtime import Runtime
from ephemera.retries import taken_over

Logger = logging.Logger | logging.LoggerAdapter[Any]
MAX_DELAY = 60.0  # the longest backoff between two tries of one handler
NAMESPACE_WAIT = 60.0  # a teardown re-checks its namespace at least this often while it terminates


class Reconciliation(NamedTuple):
    """What a handler works with: the service, the parsed object, and its logger."""

    service: Environments
    env: Environment
    log: Logger


def env_logger(logger: Logger, env: Environment) -> Logger:
    """kopf's per-object logger with the repository and PR in every line; its lines are not posted as
    Events (k8s_skip): every one that matters is posted by the service's recorder, with a reason."""
    extra = {"repository": env.spec.repository, "pr": env.spec.pull_request, "k8s_skip": True}
    return logging.LoggerAdapter(logger, extra)


@contextlib.contextmanager
def reconciling(
    handler: str,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: Logger,
    *,
    retry: int,
    runtime: datetime.timedelta,
    teardown: bool = False,
) -> Iterator[Reconciliation]:
    """Parse `body` for the handler `handler` (its kopf id, the metric's label), and apply the error
    policy to what the block raises; `retry` and `runtime` are kopf's own (tries so far, time since
    the first). Counted as a handler run in flight meanwhile."""
    with handling():
        started = time.perf_counter()
        shared: Runtime = memo.runtime
        service = shared.environments
        try:
            env = Environment.from_body(dict(body))
        except PermanentFailure as failure:
            # A spec the API server let through but that cannot work: say so on the object.
            reconciled(handler, "failure", started)
            logger.error("%s: %s", failure.reason, failure.message)
            service.refuse(body.metadata["name"], failure)
            raise kopf.PermanentError(failure.message) from failure
        # kopf's own lines about the object name its PR too, even when this handler runs before the watch's
        # `track` has seen the object.
        shared.subjects.remember(env.name, env.spec.repository, env.spec.pull_request)
        log = env_logger(logger, env)
        if not teardown and retry > 0 and taken_over(env.status, datetime.datetime.now(datetime.UTC) - runtime):
            # The stale sweep (or another) gave up on this attempt; the retry job owns the object from here.
            reconciled(handler, "handed-over", started)
            raise kopf.PermanentError("handed over to the retry timer after the stale sweep")
        try:
            if not teardown:
                _time_limits(shared, env, log, runtime.total_seconds())
            yield Reconciliation(service, env, log)
        except Failure as error:
            if error.permanent:
                reconciled(handler, "failure", started)
                shared.warned.discard(env.uid)
                service.fail(env, error, log)
                raise kopf.PermanentError(error.message) from error
            reconciled(handler, "retry", started)
            delay = backoff.delay(retry, error.delay, MAX_DELAY) if error.backoff else error.delay
            if error.backoff:  # plain waiting (for a namespace to go) is not worth an Event each poll
                log.warning("%s: %s (retry in %.0f s)", error.reason, error.message, delay)
                service.recorder(env.ref(), "Warning", error.reason, f"{error.message} (retry in {delay:.0f} s)")
            raise kopf.TemporaryError(error.message, delay=delay) from error
        reconciled(handler, "success", started)
        shared.warned.discard(env.uid)


def _time_limits(shared: Runtime, env: Environment, log: Logger, elapsed: float) -> None:
    """Fail past the hard time limit; warn once past the soft one."""
    limits = shared.settings
    if elapsed > limits.hard_time_limit:
        raise PermanentFailure(
            "HardTimeLimit",
            f"Not Ready after {elapsed:.0f} s (hard limit EPHEMERA_HARD_TIME_LIMIT={limits.hard_time_limit:.0f} s);"
            " see the Events for the cause, fix it, then retry.",
        )
    if elapsed > limits.soft_time_limit and env.uid not in shared.warned:
        shared.warned.add(env.uid)
        log.warning("Still not Ready after %.0f s (soft time limit)", elapsed)
        shared.environments.recorder(env.ref(), "Warning", "SoftTimeLimit", f"Still not Ready after {elapsed:.0f} s")


async def awaiting_teardown(
    terminating: Terminating, body: kopf.Body, memo: kopf.Memo, logger: Logger, *, runtime: datetime.timedelta
) -> None:
    """Wait for the watch to see the teardown's namespaces go (no polling while they terminate), then
    announce the end; else kopf calls the handler again. Past EPHEMERA_NAMESPACE_DELETE_TIMEOUT
    (counted from the teardown's start, kopf's `runtime`) the object says what holds a namespace,
    again only when that changes; the teardown goes on waiting."""
    shared: Runtime = memo.runtime
    service = shared.environments
    timeout = shared.settings.namespace_delete_timeout
    started = time.monotonic()
    # Wake at the timeout if it is still ahead, so that the report comes on time.
    left = timeout - runtime.total_seconds()
    within = min(NAMESPACE_WAIT, left) if left > 0 else NAMESPACE_WAIT
    await asyncio.gather(*(shared.vanishing.wait(uid, within) for _, uid in terminating.namespaces))
    try:
        finished = await asyncio.to_thread(service.finish, terminating)
        if not finished and runtime.total_seconds() + time.monotonic() - started >= timeout:
            env, names = terminating.env, [name for name, _ in terminating.namespaces]
            previous = (body.get("status") or {}).get("message")  # the last report, if any
            message = await asyncio.to_thread(
                service.report_stuck, env, names, timeout, "EPHEMERA_NAMESPACE_DELETE_TIMEOUT", previous
            )
            if message and message != previous:
                env_logger(logger, env).warning("%s", message)
    except Failure as error:
        raise kopf.TemporaryError(error.message, delay=1) from error
    except KubeError as error:
        raise kopf.TemporaryError(str(error), delay=1) from error
    if not finished:
        raise kopf.TemporaryError(f"waiting for namespace {terminating.names} to be gone", delay=1)
