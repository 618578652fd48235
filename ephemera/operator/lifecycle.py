"""kopf handlers of the PreviewEnvironment lifecycle: thin, each validates and calls the service."""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import kopf

from ephemera import backoff
from ephemera.api.models import KIND, RESOURCE, Phase
from ephemera.api.naming import MANAGED_BY, MANAGED_BY_LABEL
from ephemera.environments import Environment, Environments, Failure, PermanentFailure, Terminating
from ephemera.github.reporter import reported_is_current
from ephemera.kube import KubeError
from ephemera.operator.metrics import reconciled
from ephemera.operator.runtime import Runtime
from ephemera.sweeps import Seen

Logger = logging.Logger | logging.LoggerAdapter[Any]
MAX_DELAY = 60.0
NAMESPACE_WAIT = 60.0  # a teardown re-checks its namespace at least this often while it terminates
T = TypeVar("T")


class Vanishing:
    """Namespaces the watch saw deleted, by uid: a teardown waits on them instead of polling."""

    def __init__(self, remember: int = 10_000) -> None:
        self._gone: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._remember = remember

    def gone(self, uid: str) -> None:
        self._gone[uid] = None
        while len(self._gone) > self._remember:
            self._gone.popitem(last=False)
        for waiter in self._waiters.pop(uid, []):
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, uid: str, within: float) -> bool:
        """Whether the namespace with `uid` went within `within` seconds (or had gone already)."""
        if uid in self._gone:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(uid, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, within)
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(uid, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(uid, None)


def _env_logger(logger: Logger, env: Environment) -> Logger:
    """kopf's per-object logger with the repository and PR in every line; its lines are not posted as
    Events (k8s_skip): every one that matters is posted by the service's recorder, with a reason."""
    extra = {"repository": env.spec.repository, "pr": env.spec.pull_request, "k8s_skip": True}
    return logging.LoggerAdapter(logger, extra)


def _run(
    handler: str,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: Logger,
    retry: int,
    runtime: datetime.timedelta,
    work: Callable[[Environments, Environment, Logger], T],
    *,
    teardown: bool = False,
) -> T:
    """Run `work`, turning failures into kopf's retry or stop, the status and an Event.

    A `teardown` has no time limit and is never handed over: kopf releases the finalizer when its
    delete handler stops, so it must stop only once the namespace is gone."""
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
    log = _env_logger(logger, env)
    if not teardown and retry > 0 and env.status.phase is Phase.FAILED and env.status.reason == "Stale":
        # The stale sweep gave up on this attempt; the retry timer owns the object from here.
        reconciled(handler, "handed-over", started)
        raise kopf.PermanentError("handed over to the retry timer after the stale sweep")
    limits = shared.settings
    elapsed = runtime.total_seconds()
    time_limited = not teardown
    try:
        if time_limited and elapsed > limits.hard_time_limit:
            raise PermanentFailure(
                "HardTimeLimit",
                f"Not Ready after {elapsed:.0f} s (hard limit EPHEMERA_HARD_TIME_LIMIT={limits.hard_time_limit:.0f} s);"
                " see the Events for the cause, fix it, then retry.",
            )
        if time_limited and elapsed > limits.soft_time_limit and env.uid not in shared.warned:
            shared.warned.add(env.uid)
            log.warning("Still not Ready after %.0f s (soft time limit)", elapsed)
            service.recorder(env.ref(), "Warning", "SoftTimeLimit", f"Still not Ready after {elapsed:.0f} s")
        result = work(service, env, log)
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
    return result


@kopf.on.create(*RESOURCE, id="provision")
def provision(
    *, body: kopf.Body, memo: kopf.Memo, logger: Logger, retry: int, runtime: datetime.timedelta, **_: Any
) -> None:
    _run(
        "provision",
        body,
        memo,
        logger,
        retry,
        runtime,
        lambda service, env, log: service.provision(env, updating=False, logger=log),
    )


@kopf.on.update(*RESOURCE, id="update", field="spec")
def update(
    *, body: kopf.Body, memo: kopf.Memo, logger: Logger, retry: int, runtime: datetime.timedelta, **_: Any
) -> None:
    _run(
        "update",
        body,
        memo,
        logger,
        retry,
        runtime,
        lambda service, env, log: service.provision(env, updating=True, logger=log),
    )


def _needs_work(status: kopf.Status, body: kopf.Body) -> bool:
    phase = status.get("phase")
    if phase == Phase.FAILED.value and status.get("permanent"):
        return False  # waits for a spec change or a manual retry
    settled = phase in (Phase.READY.value, Phase.FAILED.value)
    return not (settled and status.get("observedGeneration") == body.metadata.get("generation"))


@kopf.on.resume(*RESOURCE, id="resume", when=lambda status, body, **_: _needs_work(status, body))
def resume(
    *, body: kopf.Body, memo: kopf.Memo, logger: Logger, retry: int, runtime: datetime.timedelta, **_: Any
) -> None:
    """After a restart: finish what was under way; Ready objects cost nothing here."""
    updating = body.get("status", {}).get("phase") in (Phase.UPDATING.value, Phase.READY.value)
    _run(
        "resume",
        body,
        memo,
        logger,
        retry,
        runtime,
        lambda service, env, log: service.provision(env, updating=updating, logger=log),
    )


@kopf.on.delete(*RESOURCE, id="destroy")
async def destroy(
    *, body: kopf.Body, memo: kopf.Memo, logger: Logger, retry: int, runtime: datetime.timedelta, **_: Any
) -> None:
    """Delete the namespace, then wait for the watch to see it go: no polling while it terminates.
    Past EPHEMERA_NAMESPACE_DELETE_TIMEOUT (counted from the teardown's start) the object says, once,
    what holds the namespace; the teardown goes on waiting."""
    terminating: Terminating | None = await asyncio.to_thread(
        _run,
        "destroy",
        body,
        memo,
        logger,
        retry,
        runtime,
        lambda service, env, log: service.destroy(env, logger=log),
        teardown=True,
    )
    if terminating is None:
        return
    shared: Runtime = memo.runtime
    vanishing = shared.vanishing
    timeout = shared.settings.namespace_delete_timeout
    started = time.monotonic()
    # Wake at the timeout if it is still ahead, so that the report comes on time.
    left = timeout - runtime.total_seconds()
    within = min(NAMESPACE_WAIT, left) if left > 0 else NAMESPACE_WAIT
    await asyncio.gather(*(vanishing.wait(uid, within) for _, uid in terminating.namespaces))
    service = shared.environments
    try:
        finished = await asyncio.to_thread(service.finish, terminating)
        if not finished and runtime.total_seconds() + time.monotonic() - started >= timeout:
            # Said again only when what blocks it changes (the status holds the last report).
            env, names = terminating.env, [name for name, _ in terminating.namespaces]
            previous = (body.get("status") or {}).get("message")
            message = await asyncio.to_thread(
                service.report_stuck, env, names, timeout, "EPHEMERA_NAMESPACE_DELETE_TIMEOUT", previous
            )
            if message and message != previous:
                _env_logger(logger, env).warning("%s", message)
    except Failure as error:
        raise kopf.TemporaryError(error.message, delay=1) from error
    except KubeError as error:
        raise kopf.TemporaryError(str(error), delay=1) from error
    if not finished:
        raise kopf.TemporaryError(f"waiting for namespace {terminating.names} to be gone", delay=1)


@kopf.on.event(*RESOURCE, id="track")
async def track(*, event: kopf.RawEvent, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Keep every object's phase in memory: feeds the phase gauge and the sweeps with no API call."""
    runtime: Runtime = memo.runtime
    phases = runtime.phases
    if event.get("type") == "DELETED":
        phases.pop(name, None)
        return
    obj: dict[str, Any] = dict(event.get("object") or {})
    status = obj.get("status") or {}
    template = status.get("template") or {}
    phases[name] = Seen(
        uid=obj["metadata"]["uid"],
        phase=status.get("phase") or Phase.PENDING.value,
        since=status.get("lastTransitionTime"),
        deleted_at=obj["metadata"].get("deletionTimestamp"),
        failed_at=status.get("failedAt"),
        retries=int(status.get("retries") or 0),
        permanent=bool(status.get("permanent")),
        reason=status.get("reason"),
        repository=(obj.get("spec") or {}).get("repository"),
        template=template.get("name"),
        template_generation=template.get("generation"),
    )


def _deleted(event: kopf.RawEvent, **_: Any) -> bool:
    return event.get("type") == "DELETED"


@kopf.on.event("v1", "namespaces", id="namespace-gone", labels={MANAGED_BY_LABEL: MANAGED_BY}, when=_deleted)
async def namespace_gone(*, event: kopf.RawEvent, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """A namespace of ours is gone: wake the teardown waiting for it, or, while its environment
    lives on, re-create it at once."""
    obj: dict[str, Any] = dict(event.get("object") or {})
    runtime: Runtime = memo.runtime
    runtime.vanishing.gone(obj["metadata"]["uid"])
    refs: list[dict[str, Any]] = obj.get("metadata", {}).get("ownerReferences") or []
    owners = [ref for ref in refs if ref.get("kind") == KIND]
    seen = runtime.phases.get(owners[0]["name"]) if owners else None
    if seen is None and runtime.settings.shards > 1:
        return  # another shard's environment (this watch holds only this shard's)
    if owners and not (seen is not None and seen.deleting):  # a teardown needs nothing more
        await asyncio.to_thread(_recreate, runtime.environments, owners[0]["name"], obj["metadata"]["name"], logger)


def _recreate(service: Environments, env_name: str, namespace: str, logger: Logger) -> None:
    env = service.ready_with(env_name, namespace)
    if env is None:
        return
    try:
        service.provision(env, updating=True, logger=_env_logger(logger, env))
    except Failure as failure:
        # The stale sweep retries a Ready environment without its namespace.
        logger.warning("Could not re-create namespace of %s: %s", env_name, failure.message)


def _report_outdated(status: kopf.Status, spec: kopf.Spec, **_: Any) -> bool:
    return not reported_is_current(dict(status), dict(spec))


@kopf.on.resume(*RESOURCE, id="report-resume", when=_report_outdated)
def report_resume(*, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """After a restart: report a state that was reached but not yet reported (the object says which)."""
    try:
        env = Environment.from_body(dict(body))
    except PermanentFailure:
        return  # an invalid spec has nothing to report; its Failed status says why
    status = dict(body.get("status") or {})
    conditions = status.get("conditions") or [{}]
    runtime: Runtime = memo.runtime
    runtime.reporter.listener(
        env.announcement(
            old_phase=None,
            phase=str(status.get("phase")),
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or ""),
            at=str(conditions[0].get("lastTransitionTime") or ""),
            status=status,
            resumed=True,
        )
    )
