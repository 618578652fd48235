"""Sharded operators: which objects are this shard's, and the handover that moves one to another shard.

Each PreviewEnvironment carries `ephemera.dev/shard` (`shard_of` its repository, modulo
EPHEMERA_SHARDS), written by the webhook when it creates the object. With more than one shard, each
operator Deployment watches only its own label (a server-side selector), so the API server is the
only coordinator: no object is ever in two shards' watches at once.

When EPHEMERA_SHARDS changes, an object's label may name the wrong shard. The shard that holds it
moves it (`move`), and only once it is *settled*: its handlers are done (no kopf progress is stored
on it, its handled spec is its spec, its status observes its generation in a final phase) and
nothing the operator owes it will run by itself (a Failed environment still due a retry waits for
it). The move is a label patch conditional on the resourceVersion that was judged settled: a change
since then (a push, a retry) fails it with 409, and the object stays where it is until its new work
is done. The object then leaves the old shard's watch (a DELETED event there, which kopf never
answers with a write) and enters the new one's with nothing left to do, so no provision runs twice
and none is lost. Objects no shard watches (no label, or an index at or above EPHEMERA_SHARDS after
the count shrank) are adopted by shard 0 the same way (`Strays`).
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ephemera.api.models import Phase, parse_time
from ephemera.api.naming import KOPF_DIFFBASE_KEY, KOPF_STATUS, RETRY_ANNOTATION, SHARD_LABEL, shard_of
from ephemera.config import Settings
from ephemera.kube import Kube, KubeError, Obj
from ephemera.retries import retried_later

log = logging.getLogger(__name__)

# kopf's storage on the object (operator/persistence.py): progress under `<prefix>/<handler id>`, the
# last handled essence in `status.kopf` (or, from an older operator, under `<prefix>/<diff-base key>`).
KOPF_PREFIX = "ephemera.dev"
DIFFBASE_ANNOTATION = f"{KOPF_PREFIX}/{KOPF_DIFFBASE_KEY}"
HANDLER_IDS = ("provision", "update", "resume", "destroy", "report-resume")


def selector(shard: int) -> str:
    """The label selector of one shard's objects."""
    return f"{SHARD_LABEL}={shard}"


def strays_selectors(shards: int) -> list[str]:
    """Label selectors of the objects no shard watches: no label, or an index out of range."""
    indexes = ",".join(str(i) for i in range(shards))
    return [f"!{SHARD_LABEL}", f"{SHARD_LABEL},{SHARD_LABEL} notin ({indexes})"]


def label(obj: Mapping[str, Any]) -> str | None:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    value = labels.get(SHARD_LABEL)
    return None if value is None else str(value)


def target(obj: Mapping[str, Any], shards: int) -> int | None:
    """The shard the object belongs to now; None if its spec names no repository."""
    repository = (obj.get("spec") or {}).get("repository")
    return None if not repository else shard_of(str(repository), shards)


def ours(obj: Mapping[str, Any], settings: Settings) -> bool:
    """Whether this operator handles the object (unsharded, it handles every one)."""
    return settings.shard_handles((obj.get("metadata") or {}).get("labels"))


def misplaced(obj: Mapping[str, Any], shards: int) -> bool:
    """Whether the object's label names another shard than its repository's (with several shards)."""
    wanted = target(obj, shards)
    return shards > 1 and wanted is not None and label(obj) != str(wanted)


def _kopf_idle(annotations: Mapping[str, Any]) -> bool:
    return not any(f"{KOPF_PREFIX}/{handler}" in annotations for handler in HANDLER_IDS)


def _handled_record(obj: Mapping[str, Any]) -> Any:
    """kopf's record of the last handled spec: in `status.kopf` (operator/persistence.py), or in the
    annotation where an older operator left it."""
    record = ((obj.get("status") or {}).get(KOPF_STATUS) or {}).get(KOPF_DIFFBASE_KEY)
    if record is None:
        record = ((obj.get("metadata") or {}).get("annotations") or {}).get(DIFFBASE_ANNOTATION)
    return record


def _handled_spec(obj: Mapping[str, Any]) -> Any:
    try:
        return (json.loads(str(_handled_record(obj) or "null")) or {}).get("spec")
    except (ValueError, AttributeError):
        return None


def settled(obj: Mapping[str, Any], settings: Settings) -> bool:
    """Whether nothing is in flight for the object, nor due to start by itself (see the module's doc)."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    if meta.get("deletionTimestamp") or not _kopf_idle(annotations):
        return False
    if _handled_spec(obj) != obj.get("spec"):
        return False  # never handled, or a spec change kopf has not handled yet
    retry = annotations.get(RETRY_ANNOTATION)
    if retry and retry != status.get("retryRequest"):
        return False  # a person's retry is on its way
    if status.get("observedGeneration") != meta.get("generation"):
        return False
    phase = status.get("phase")
    if phase == Phase.READY.value:
        return True
    return phase == Phase.FAILED.value and not retried_later(status, settings)


def untouched(obj: Mapping[str, Any]) -> bool:
    """Whether no operator ever handled the object: no status, no kopf state on it."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return not (obj.get("status") or {}).get("phase") and _handled_record(obj) is None and _kopf_idle(annotations)


def move(kube: Kube, obj: Obj, shard: int) -> bool:
    """Relabel the object to `shard` if it is unchanged since it was read; whether it moved."""
    meta = obj["metadata"]
    patch = {"metadata": {"resourceVersion": meta["resourceVersion"], "labels": {SHARD_LABEL: str(shard)}}}
    try:
        kube.patch_environment(meta["name"], patch, missing_ok=False)
    except KubeError as err:
        if err.status in (404, 409):
            return False  # gone, or changed since it was judged: judged again on its next event
        raise
    log.info("moved %s from shard %s to shard %d", meta["name"], label(obj) or "(none)", shard, extra={"shard": shard})
    return True


class Strays:
    """Shard 0 adopts the objects no shard watches: settled or never handled ones at once, and one left
    mid-way by a shard that is gone once its last transition is older than EPHEMERA_STALE_THRESHOLD (its
    operator is surely gone by then; the new owner resumes from the progress kopf stored on it)."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings

    def adopt(self, now: datetime.datetime | None = None) -> int:
        if self.settings.shards == 1:
            return 0  # one shard watches every object, labelled or not
        now = now or datetime.datetime.now(datetime.UTC)
        moved = 0
        for obj in self._listed():
            wanted = target(obj, self.settings.shards)
            if wanted is None or not self._quiet(obj, now):
                continue
            moved += move(self.kube, obj, wanted)
        return moved

    def _listed(self) -> Iterable[Obj]:
        for labels in strays_selectors(self.settings.shards):
            yield from self.kube.list_environments(labels)

    def _quiet(self, obj: Obj, now: datetime.datetime) -> bool:
        if settled(obj, self.settings) or untouched(obj):
            return True
        status = obj.get("status") or {}
        since = parse_time(status.get("lastTransitionTime")) or parse_time(obj["metadata"].get("creationTimestamp"))
        return since is not None and (now - since).total_seconds() > self.settings.stale_threshold
