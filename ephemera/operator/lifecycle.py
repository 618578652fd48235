"""kopf handlers of the PreviewEnvironment lifecycle: each parses the object, calls one service
method and returns; the error policy around them is `reconciling`."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from typing import Any

import kopf

from ephemera import retries
from ephemera.api.models import KIND, RESOURCE, Phase
from ephemera.api.naming import MANAGED_BY, MANAGED_BY_LABEL
from ephemera.environments import Environment, Environments, Failure, PermanentFailure, Terminating
from ephemera.github.reports import reported_is_current
from ephemera.operator.reconciling import Logger, awaiting_teardown, env_logger, reconciling
from ephemera.operator.runtime import Runtime
from ephemera.transitions import Transition
from ephemera.watchcache import Seen


def _provisioning(handler: str, updating: Callable[[kopf.Body], bool]) -> Callable[..., None]:
    """The handler `handler` (its kopf id, the metric's label) of the three that provision: it ends
    with the status in kopf's own patch (`patch.status`), written with kopf's record of the object once
    it returns: one write (see operator/persistence.py)."""

    def run(
        *,
        body: kopf.Body,
        memo: kopf.Memo,
        logger: Logger,
        retry: int,
        runtime: datetime.timedelta,
        patch: kopf.Patch,
        **_: Any,
    ) -> None:
        with reconciling(handler, body, memo, logger, retry=retry, runtime=runtime) as (_service, env, log):
            memo.runtime.admission.provision(env, updating=updating(body), logger=log, into=patch.status)

    return run


def _needs_work(status: kopf.Status, body: kopf.Body) -> bool:
    phase = status.get("phase")
    if phase == Phase.FAILED.value and status.get("permanent"):
        return False  # waits for a spec change or a manual retry
    # Queued and Expired wait for the policy (a slot, a push, a wake), not for a handler.
    settled = phase in (Phase.READY.value, Phase.FAILED.value, Phase.QUEUED.value, Phase.EXPIRED.value)
    return not (settled and status.get("observedGeneration") == body.metadata.get("generation"))


def _was_updating(body: kopf.Body) -> bool:
    return body.get("status", {}).get("phase") in (Phase.UPDATING.value, Phase.READY.value)


provision = kopf.on.create(*RESOURCE, id="provision")(_provisioning("provision", lambda _: False))
update = kopf.on.update(*RESOURCE, id="update", field="spec")(_provisioning("update", lambda _: True))
# After a restart: finish what was under way; Ready objects cost nothing here (`_needs_work`).
resume = kopf.on.resume(*RESOURCE, id="resume", when=lambda status, body, **_: _needs_work(status, body))(
    _provisioning("resume", _was_updating)
)


@kopf.on.delete(*RESOURCE, id="destroy")
async def destroy(
    *, body: kopf.Body, memo: kopf.Memo, logger: Logger, retry: int, runtime: datetime.timedelta, **_: Any
) -> None:
    """Delete the namespace, then wait for the watch to see it go (`awaiting_teardown`)."""
    terminating = await asyncio.to_thread(_tear_down, body, memo, logger, retry, runtime)
    if terminating is not None:
        await awaiting_teardown(terminating, body, memo, logger, runtime=runtime)


def _tear_down(
    body: kopf.Body, memo: kopf.Memo, logger: Logger, retry: int, runtime: datetime.timedelta
) -> Terminating | None:
    with reconciling("destroy", body, memo, logger, retry=retry, runtime=runtime, teardown=True) as (service, env, log):
        return service.destroy(env, logger=log)


@kopf.on.event(*RESOURCE, id="track")
async def track(*, event: kopf.RawEvent, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Keep every object's phase in memory: feeds the phase gauge and the sweeps with no API call."""
    runtime: Runtime = memo.runtime
    phases = runtime.phases
    if event.get("type") == "DELETED":
        phases.pop(name, None)
        runtime.subjects.forget(name)
        return
    obj: dict[str, Any] = dict(event.get("object") or {})
    spec = obj.get("spec") or {}
    runtime.subjects.remember(name, spec.get("repository"), spec.get("pullRequest"))
    phases[name] = Seen.from_body(obj)


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
        service.provision(env, updating=True, logger=env_logger(logger, env))
    except Failure as failure:
        # The stale sweep retries a Ready environment without its namespace.
        logger.warning("Could not re-create namespace of %s: %s", env_name, failure.message)


def _retry_requested(body: kopf.Body, **_: Any) -> bool:
    return retries.retry_requested(body) is not None


# Filtered by `when`, so that the many events of the objects nobody asked to retry cost no thread.
@kopf.on.event(*RESOURCE, id="manual-retry", when=_retry_requested)
def manual_retry(*, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """`kubectl annotate pe NAME ephemera.dev/retry=<anything new> --overwrite` (or `ephemera environments retry`).

    An event handler, not a field handler: the annotation lives outside what kopf diffs.
    """
    request = retries.retry_requested(body)
    if request is None:
        return
    if (body.get("status") or {}).get("phase") not in (Phase.FAILED.value, Phase.READY.value):
        return  # under way already: the running handler will settle it
    runtime: Runtime = memo.runtime
    retries.retry(runtime.environments, dict(body), manual=request, logger=logger)


def _report_outdated(status: kopf.Status, spec: kopf.Spec, **_: Any) -> bool:
    return not reported_is_current(dict(status), dict(spec))


@kopf.on.resume(*RESOURCE, id="report-resume", when=_report_outdated)
def report_resume(*, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """After a restart: report a state that was reached but not yet reported (the object says which)."""
    try:
        env = Environment.from_body(dict(body))
    except PermanentFailure:
        return  # an invalid spec has nothing to report; its Failed status says why
    if env.status.phase is None:
        return  # no phase reached yet: nothing to report
    runtime: Runtime = memo.runtime
    runtime.reporter.listener(_reached(env, env.status.phase, dict(body.get("status") or {})))


def _reached(env: Environment, phase: Phase, status: dict[str, Any]) -> Transition:
    """The state the object's status says it reached, announced again (to the reporter alone)."""
    return env.announcement(
        old_phase=None,
        phase=phase,
        reason=str(status.get("reason") or ""),
        message=str(status.get("message") or ""),
        at=str(status.get("lastTransitionTime") or ""),  # when the phase began
        status=status,
        resumed=True,
    )
