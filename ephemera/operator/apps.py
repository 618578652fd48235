"""kopf handlers of the application in a preview: the PreviewTemplates, and the workloads a rollout awaits.

Templates are kept from a watch (listed once at start, before any environment is provisioned), so a
provision asks the API server nothing to find its template. A rollout that was applied but not yet
ready is settled by the changes of its own workloads and pods (they carry the environment's label):
watched, not polled. Only a deadline needs a clock: the periodic job in timers.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from ephemera.environments import ROLLING_OUT, Environments
from ephemera.kube import Kube, KubeError
from ephemera.models import GROUP, TEMPLATE_PLURAL, VERSION, Phase
from ephemera.naming import ENVIRONMENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL
from ephemera.sweeps import Seen
from ephemera.templates import Template, TemplateError

log = logging.getLogger(__name__)
SETTLE_DELAY = 0.2  # seconds that changes of one environment's workloads are gathered before one check


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

    def drop(self, name: str) -> None:
        self._bodies.pop(name, None)

    def __call__(self) -> list[Template]:
        parsed: list[Template] = []
        for body in list(self._bodies.values()):
            try:
                parsed.append(Template.from_body(body))
            except TemplateError as err:  # the CRD lets little through that the model refuses
                log.warning("%s; the template is ignored", err.message)
        return parsed


@kopf.on.event(GROUP, VERSION, TEMPLATE_PLURAL, id="templates")
def template_changed(*, event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    templates: Templates = memo.templates
    body: dict[str, Any] = dict(event.get("object") or {})
    if event.get("type") == "DELETED":
        templates.drop(body["metadata"]["name"])
    elif body.get("metadata"):
        templates.put(body)


class Settler:
    """Settle waiting rollouts, one check per environment however many of its objects changed."""

    def __init__(self, service: Environments) -> None:
        self.service = service
        self._due: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rollout-settler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def poke(self, name: str) -> None:
        self._due.add(name)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(SETTLE_DELAY)
            self._wake.clear()
            due, self._due = self._due, set()
            for name in sorted(due):
                try:
                    await asyncio.to_thread(self.service.settle, name, log)
                except Exception as err:  # the next change, or the periodic check, tries again
                    log.warning("could not settle the rollout of %s: %s", name, err)


def waiting(seen: Seen | None) -> bool:
    """Whether the watch says this environment waits for its app (no API call)."""
    return (
        seen is not None
        and not seen.deleting
        and seen.phase in (Phase.PROVISIONING.value, Phase.UPDATING.value)
        and seen.reason == ROLLING_OUT
    )


async def _workload_changed(*, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    name = labels.get(ENVIRONMENT_LABEL)
    if name and waiting(memo.phases.get(name)):
        settler: Settler = memo.settler
        settler.poke(name)


# Each kind a rollout waits on, watched only where Ephemera applied it (its pods carry the labels too).
for _resource in [
    ("apps/v1", "deployments"),
    ("apps/v1", "statefulsets"),
    ("apps/v1", "daemonsets"),
    ("apps/v1", "replicasets"),
    ("batch/v1", "jobs"),
    ("v1", "pods"),
]:
    kopf.on.event(
        *_resource,
        id=f"app-{_resource[1]}",
        labels={MANAGED_BY_LABEL: MANAGED_BY, ENVIRONMENT_LABEL: kopf.PRESENT},
    )(_workload_changed)
