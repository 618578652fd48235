"""kopf handlers of the application in a preview: the PreviewTemplates, and the workloads a rollout awaits.

Templates are kept from a watch (listed once at start, before any environment is provisioned), so a
provision asks the API server nothing to find its template. An edited template (a new generation; a
template created or deleted after the start) is re-applied to the environments it concerns, at a
bounded rate (`Rollouts`). A rollout that was applied but not yet ready is settled by the changes of
its own workloads and pods (they carry the environment's label): watched, not polled. Only a deadline
needs a clock: the periodic job in jobs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from ephemera.api.models import GROUP, PLURAL, TEMPLATE_PLURAL, VERSION, Phase, now_iso
from ephemera.api.naming import ENVIRONMENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL
from ephemera.config import Settings
from ephemera.environments import ROLLING_OUT, Environment, Environments, Failure
from ephemera.kube import Kube, KubeError
from ephemera.logs import about
from ephemera.operator.runtime import Runtime
from ephemera.readiness import WORKLOAD_KINDS, workload_state
from ephemera.retries import retried_later
from ephemera.shards import ours
from ephemera.templates import Template, TemplateError, select
from ephemera.watchcache import Seen

log = logging.getLogger(__name__)
SETTLE_DELAY = 0.2  # seconds that changes of one environment's workloads are gathered before one check
DEFER_DELAY = 5.0  # seconds before an environment that was mid-rollout is looked at again


class Templates:
    """The PreviewTemplates, kept current by the watch."""

    def __init__(self) -> None:
        self._bodies: dict[str, dict[str, Any]] = {}

    def prime(self, kube: Kube) -> None:
        """List them once before any provision runs; no CRD yet means no templates."""
        try:
            self._bodies = {body["metadata"]["name"]: body for body in kube.list_templates()}
        except KubeError as err:
            if err.status != 404:
                raise
            log.info("no PreviewTemplate CRD installed: environments are namespaces only")

    def put(self, body: dict[str, Any]) -> None:
        self._bodies[body["metadata"]["name"]] = body

    def generation(self, name: str) -> int | None:
        """The generation of the template as last seen; None if it is not known."""
        body = self._bodies.get(name)
        return None if body is None else int(body["metadata"].get("generation") or 1)

    def drop(self, name: str) -> None:
        self._bodies.pop(name, None)

    def follow(self, event: kopf.RawEvent) -> str | None:
        """Apply a watch event; the template's name if that is an edit (a generation the cache did not
        hold, or a known template deleted), else None."""
        body: dict[str, Any] = dict(event.get("object") or {})
        meta = body.get("metadata") or {}
        if not meta.get("name"):
            return None
        name = str(meta["name"])
        before = self.generation(name)
        if event.get("type") == "DELETED":
            self.drop(name)
            return name if before is not None else None
        self.put(body)
        return name if before != int(meta.get("generation") or 1) else None

    def bodies(self) -> list[dict[str, Any]]:
        """The templates as the API server has them (the policy reads their `policy` blocks)."""
        return list(self._bodies.values())

    def __call__(self) -> list[Template]:
        parsed: list[Template] = []
        for body in list(self._bodies.values()):
            try:
                parsed.append(Template.from_body(body))
            except TemplateError as err:  # the CRD lets little through that the model refuses
                log.warning("%s; the template is ignored", err.message)
        return parsed


@kopf.on.event(GROUP, VERSION, TEMPLATE_PLURAL, id="templates")
async def template_changed(*, event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Keep the cache current; an edit (a generation the cache did not hold) rolls out. The listing at
    the start repeats what `Templates.prime` read, so it rolls nothing out. On the event loop (memory
    only): the rollout queue is the loop's."""
    runtime: Runtime = memo.runtime
    edited = runtime.templates.follow(event)
    if edited is not None:
        runtime.rollouts.changed(edited)


def _wanted(templates: list[Template], repository: str) -> tuple[str, int] | None:
    """(name, generation) of the template `repository` gets now; None for a namespace only."""
    try:
        template = select(templates, repository)
    except TemplateError:
        return ("", -1)  # ambiguous: a provision says so on the object, which nothing else matches
    return None if template is None else (template.name, template.generation)


class Rollouts:
    """Re-provision the environments an edited PreviewTemplate concerns, at most `rate` per second.

    Concerned are the environments whose repository selects the template now, and those whose app came
    from it (a template deleted or narrowed: their app is pruned, or comes from the template they match
    now). One that already runs the template's generation is skipped; one mid-rollout or retried later
    by the retry job is left to its handler (a mid-rollout one is looked at again once it settles, in
    case it applied the generation before); one being deleted is dropped."""

    def __init__(
        self,
        service: Environments,
        templates: Templates,
        phases: dict[str, Seen],
        *,
        rate: float,
        active: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.service = service
        self.templates = templates
        self.phases = phases
        self.interval = 1.0 / rate
        self._active = active
        self._queue: dict[str, None] = {}  # environment names, in order, each once
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def settings(self) -> Settings:
        return self.service.settings

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="template-rollouts")

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._running] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def changed(self, template: str) -> int:
        """Queue the environments that `template` concerns; how many were queued."""
        current = self.templates()
        queued = 0
        for name, seen in list(self.phases.items()):
            if seen.deleting or seen.repository is None:
                continue
            wanted = _wanted(current, seen.repository)
            if seen.template == template or (wanted is not None and wanted[0] in (template, "")):
                queued += self._add(name)
        if queued:
            log.info(
                "PreviewTemplate %s changed: %d environment(s) to re-provision, %.3g per second",
                template,
                queued,
                1.0 / self.interval,
            )
        return queued

    def _add(self, name: str) -> int:
        if name in self._queue:
            return 0
        self._queue[name] = None
        self._wake.set()
        return 1

    def verdict(self, seen: Seen | None, wanted: tuple[str, int] | None) -> str:
        """`go`, `defer` (mid-rollout: look again later) or `skip`, from what the watch last saw."""
        if seen is None or seen.deleting or seen.repository is None:
            return "skip"
        if seen.phase not in (Phase.READY.value, Phase.FAILED.value):
            return "defer"
        if retried_later(seen.retry_status(), self.settings):  # the retry job applies the current template
            return "skip"
        have = (seen.template, seen.template_generation) if seen.template else None
        return "skip" if have == wanted else "go"

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_start = loop.time()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            name = next(iter(self._queue))
            del self._queue[name]
            seen = self.phases.get(name)
            wanted = _wanted(self.templates(), seen.repository) if seen and seen.repository else None
            verdict = self.verdict(seen, wanted)
            if verdict == "defer":
                loop.call_later(DEFER_DELAY, self._add, name)
                continue
            if verdict == "skip":
                continue
            await asyncio.sleep(max(0.0, next_start - loop.time()))
            if self._active is not None and not await self._active():
                continue  # a standby: the active replica has the same watch and does it
            # The start the rate bounds, logged before the next one is timed from it: what follows (a read
            # of the object, its Updating status, an Event) takes a time of its own for each environment.
            log.info("re-provisioning %s for its PreviewTemplate", name, extra=about(name))
            next_start = loop.time() + self.interval
            task = asyncio.create_task(self._reprovision(name), name=f"template-rollout-{name}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _reprovision(self, name: str) -> None:
        try:
            again = await asyncio.to_thread(self.reprovision, name)
        except Exception as err:  # the API server is unreachable: try it again later
            log.warning("could not re-provision %s for its PreviewTemplate: %s", name, err)
            again = True
        if again:
            asyncio.get_running_loop().call_later(DEFER_DELAY, self._add, name)

    def reprovision(self, name: str) -> bool:
        """Re-apply the environment's template if it still needs it (checked on the object itself, not
        the watch); whether to look at it again later (it was mid-rollout)."""
        body = self.service.kube.get_environment(name)
        if body is None or body["metadata"].get("deletionTimestamp") or not ours(body, self.settings):
            return False  # gone, going, or moved to another shard (whose own watch queues it)
        try:
            env = Environment.from_body(body)
        except Failure:
            return False  # an invalid spec: its Failed status says so, a template changes nothing
        status = env.status
        if status.phase not in (Phase.READY, Phase.FAILED) or status.observed_generation != env.generation:
            return True  # a push or a retry is under way: its handler applies the current template
        template = (body.get("status") or {}).get("template") or {}
        have = (template.get("name"), template.get("generation")) if template.get("name") else None
        wanted = _wanted(self.templates(), env.spec.repository)
        if have == wanted:
            return False
        what = f"PreviewTemplate {wanted[0]} generation {wanted[1]}" if wanted and wanted[0] else "no PreviewTemplate"
        if wanted is None and have is not None:
            what = f"no PreviewTemplate any more (was {have[0]})"
        env = self.service.transition(env, Phase.UPDATING, "TemplateChanged", f"Re-applying: {what}", logger=log)
        try:
            self.service.provision(env, updating=True, logger=log)
        except Failure as failure:
            if failure.permanent:
                self.service.fail(env, failure, log)
            else:  # the retry job takes it from here, with backoff
                self.service.transition(
                    env, Phase.FAILED, failure.reason, failure.message, {"failedAt": now_iso(), "permanent": False}, log
                )
        return False


class Settler:
    """Settle waiting rollouts, one check per environment however many of its objects changed."""

    def __init__(self, service: Environments) -> None:
        self.service = service
        self._due: set[str] = set()
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rollout-settler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def poke(self, name: str, *, at_once: bool = False) -> None:
        """Check `name` soon: after SETTLE_DELAY, which gathers the many changes of one rollout into one
        check, or `at_once` when a change says a workload is ready (likely the last one awaited)."""
        self._due.add(name)
        if at_once:
            self._urgent.set()
        self._wake.set()

    @property
    def due(self) -> frozenset[str]:
        """The environments to check at the next round."""
        return frozenset(self._due)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), SETTLE_DELAY)
            self._wake.clear()
            self._urgent.clear()
            due, self._due = self._due, set()
            # Side by side (in the handlers' thread pool): in a burst, one slow check must not hold the rest.
            await asyncio.gather(*(self._settle(name) for name in sorted(due)))

    async def _settle(self, name: str) -> None:
        try:
            await asyncio.to_thread(self.service.settle, name, log)
        except Exception as err:  # the next change, or the periodic check, tries again
            log.warning("could not settle the rollout of %s: %s", name, err)


# The phases of a rollout under way, as plain strings: the rollout-deadline job asks `waiting` of every
# environment every 10 s, and an Enum member's `.value` is a property call each time.
_SETTLING = frozenset({Phase.PROVISIONING.value, Phase.UPDATING.value})


def waiting(seen: Seen | None) -> bool:
    """Whether the watch says this environment waits for its app (no API call)."""
    # The reason first: it rules out nearly every environment, the settled ones, in one comparison.
    return seen is not None and seen.reason == ROLLING_OUT and seen.phase in _SETTLING and not seen.deleting


def rolling_out(body: Mapping[str, Any]) -> bool:
    """Whether an environment's object says that it waits for its app (and is not being deleted)."""
    status = body.get("status") or {}
    return status.get("reason") == ROLLING_OUT and not (body.get("metadata") or {}).get("deletionTimestamp")


def rollout_landed(settler: Settler, name: str) -> None:
    """A rollout's status is visible: check it once. Its workloads may have become ready between the
    operator's own check and this status landing; their events then came while the watch did not show
    the environment waiting yet (and were let go), and no workload changes again to settle it."""
    settler.poke(name)


def _rolling_out(body: kopf.Body, **_: Any) -> bool:
    return rolling_out(body)


@kopf.on.event(GROUP, VERSION, PLURAL, id="rollout-landed", when=_rolling_out)
async def rollout_status(*, name: str, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    rollout_landed(runtime.settler, name)


def ready_now(body: Mapping[str, Any]) -> bool:
    """Whether a watched object is a workload that is ready at its generation (from the event alone)."""
    return body.get("kind") in WORKLOAD_KINDS and workload_state(body)[0]


async def _workload_changed(*, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    name = labels.get(ENVIRONMENT_LABEL)
    runtime: Runtime = memo.runtime
    if name and waiting(runtime.phases.get(name)):
        runtime.settler.poke(name, at_once=ready_now(body))


# Each kind a rollout waits on, watched only where Ephemera applied it (its pods carry the labels too).
WORKLOADS = [
    ("apps/v1", "deployments"),
    ("apps/v1", "statefulsets"),
    ("apps/v1", "daemonsets"),
    ("apps/v1", "replicasets"),
    ("batch/v1", "jobs"),
    ("v1", "pods"),
]
# The same filter as the API server's label selector (startup.py), so that only these objects are sent.
WORKLOAD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY},{ENVIRONMENT_LABEL}"
for _resource in WORKLOADS:
    kopf.on.event(
        *_resource,
        id=f"app-{_resource[1]}",
        labels={MANAGED_BY_LABEL: MANAGED_BY, ENVIRONMENT_LABEL: kopf.PRESENT},
    )(_workload_changed)
