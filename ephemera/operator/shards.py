"""kopf handlers of sharding (ephemera/shards.py): this shard's watch, and the handover of objects whose
shard changed. Shard 0's adoption of the objects no shard watches is a periodic job (jobs.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from ephemera import shards
from ephemera.api.models import RESOURCE
from ephemera.config import get_settings
from ephemera.operator.runtime import Runtime


@kopf.on.startup(id="shard")
async def watch_own_shard(*, settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    """With several shards, watch only this shard's objects.

    A server-side label selector, not kopf's client-side `labels=` filter on the handlers: kopf
    releases the finalizer of an object that no handler of its kind matches, so a client-side filter
    would strip every other shard's objects of theirs."""
    cfg = get_settings()
    if cfg.shards > 1:
        settings.watching.label_selectors[RESOURCE] = shards.selector(cfg.shard)
        logger.info("shard %d of %d: watching PreviewEnvironments labelled %s", cfg.shard, cfg.shards, cfg.shard)


def _to_move(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> bool:
    cfg = get_settings()
    obj = dict(body)
    return event.get("type") != "DELETED" and shards.misplaced(obj, cfg.shards) and shards.settled(obj, cfg)


# Filtered by `when`, so that the events of the objects that stay cost no thread. An event handler runs
# in the object's own kopf worker, between its other handlers, never beside one of them.
@kopf.on.event(*RESOURCE, id="reshard", when=_to_move)
async def reshard(*, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The shard count changed and this settled object belongs elsewhere now: hand it over."""
    runtime: Runtime = memo.runtime
    obj = dict(body)
    wanted = shards.target(obj, runtime.settings.shards)
    if wanted is not None:
        await asyncio.to_thread(shards.move, runtime.kube, obj, wanted)
