"""kopf handlers of sharding (ephemera/shards.py): this shard's watch, the handover of objects whose
shard changed, and shard 0's adoption of the objects no shard watches."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from ephemera import shards
from ephemera.api.models import RESOURCE
from ephemera.config import Settings, get_settings
from ephemera.kube import KubeError
from ephemera.operator import timers
from ephemera.operator.startup import _identity

log = logging.getLogger(__name__)


@kopf.on.startup(id="shard")
async def watch_own_shard(*, settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """With several shards, watch only this shard's objects. Registered after startup.configure, so it
    finds the memo filled.

    A server-side label selector, not kopf's client-side `labels=` filter on the handlers: kopf
    releases the finalizer of an object that no handler of its kind matches, so a client-side filter
    would strip every other shard's objects of theirs."""
    cfg: Settings = memo.settings
    if cfg.shards == 1:
        return
    settings.watching.label_selectors[RESOURCE] = shards.selector(cfg.shard)
    logger.info("shard %d of %d: watching PreviewEnvironments labelled %s", cfg.shard, cfg.shards, cfg.shard)
    if cfg.shard == 0:
        strays = shards.Strays(memo.kube, cfg)
        identity = _identity(memo, cfg)
        priority = settings.peering.priority

        async def active() -> bool:
            try:
                return await asyncio.to_thread(timers.is_active, memo.kube, cfg.peering, priority, identity)
            except KubeError:
                return False

        async def adopt() -> None:
            moved = await asyncio.to_thread(strays.adopt)
            if moved:
                log.info("adopted %d PreviewEnvironment(s) no shard watched", moved)

        task = asyncio.create_task(timers._every(cfg.sweep_interval, adopt, "strays", active), name="strays")
        memo.periodic.append(task)  # cancelled with the other periodic jobs


def _to_move(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> bool:
    cfg = get_settings()
    obj = dict(body)
    return event.get("type") != "DELETED" and shards.misplaced(obj, cfg.shards) and shards.settled(obj, cfg)


# Filtered by `when`, so that the events of the objects that stay cost no thread. An event handler runs
# in the object's own kopf worker, between its other handlers, never beside one of them.
@kopf.on.event(*RESOURCE, id="reshard", when=_to_move)
async def reshard(*, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The shard count changed and this settled object belongs elsewhere now: hand it over."""
    cfg: Settings = memo.settings
    obj = dict(body)
    wanted = shards.target(obj, cfg.shards)
    if wanted is not None:
        await asyncio.to_thread(shards.move, memo.kube, obj, wanted)
