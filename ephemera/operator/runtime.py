"""What the operator's handlers and jobs share: made once at startup, closed at cleanup.

Held as `memo.runtime` (kopf hands `memo` to every handler). Frozen: no handler replaces a part; the
parts that are state (the watch's view of every object, the soft-limit warnings) are the containers
themselves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from ephemera.admission import Admission
from ephemera.config import Settings
from ephemera.environments import Environments
from ephemera.expiry import Expiry
from ephemera.github.outbox import Reporter
from ephemera.hooks import Hooks
from ephemera.kube import Kube
from ephemera.ledger import Ledger
from ephemera.logs import Subjects
from ephemera.store.records import Records
from ephemera.watchcache import Seen, Vanishing

if TYPE_CHECKING:  # a handler module, which reads the runtime itself
    from ephemera.operator.apps import Rollouts, Settler, Templates


@dataclass(frozen=True, kw_only=True)
class Runtime:
    settings: Settings
    environments: Environments  # the service every lifecycle handler calls
    templates: Templates  # the PreviewTemplates, kept by their watch
    settler: Settler  # settles rollouts when their workloads change
    rollouts: Rollouts  # re-applies edited templates
    reporter: Reporter  # reports each state on its PR
    hooks: Hooks  # sends each state to the result hooks' targets
    phases: dict[str, Seen]  # name -> what the watch last saw of each object (lifecycle.track)
    vanishing: Vanishing  # namespaces seen gone, for the teardowns waiting on them
    warned: set[str]  # uids already warned about the soft time limit
    # The lifecycle policy: what the caps and the expiry judge from (the watch), and the two services.
    ledger: Ledger
    admission: Admission  # every provision goes through it (caps, queue)
    expiry: Expiry
    subjects: Subjects  # name -> repository and PR of each object (lifecycle.track), for the log lines
    # Kept for the periodic jobs and for closing; no handler uses them.
    kube: Kube
    records: Records
    health: web.AppRunner
    # Started once the runtime exists, since the jobs read it (jobs.start).
    periodic: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        """Stop what produces transitions first, then drain what consumes them, then the clients."""
        for task in self.periodic:
            task.cancel()
        await self.settler.stop()
        await self.rollouts.stop()
        await self.records.stop()
        await self.reporter.stop()
        await self.hooks.stop()
        await self.health.cleanup()
        self.kube.close()
