"""Where kopf keeps its record of each object, so that a handler that is done at once costs one write.

After a handler, kopf patches the object with its record: the last handled spec (the diff-base) and,
while a handler is unfinished, its progress. A patch with metadata and status parts is two requests
(the object, then its status subresource), so:
- the diff-base lives in `status.kopf`: with the status the handler sets (a new environment's Ready,
  `Environments.transition(into=...)`), kopf's patch is one status write;
- progress stays in annotations (`ephemera.dev/<handler id>`): a handler done at first try stores and
  purges its record in the same patch, which leaves nothing, and a teardown's last patch releases the
  finalizer and purges its record in one metadata write. kopf marks the prefix of a storage it writes
  (`ephemera.dev/kopf-managed`); that mark alone, with no record left beside it, is not written.

Operators before this one kept the diff-base in an annotation. It is still read where the status has
none, so that an upgraded operator does not take every existing object for a new one (kopf would
provision them all again); the first write after the upgrade moves it to the status.
"""

from __future__ import annotations

from typing import Any

import kopf

from ephemera.api.naming import KOPF_DIFFBASE_KEY, KOPF_STATUS

STATUS_NAME = KOPF_STATUS  # status.kopf.last-handled-configuration
DIFFBASE_KEY = KOPF_DIFFBASE_KEY
MARKER = "kopf-managed"  # kopf's mark of an annotation prefix that a kopf storage writes


class ProgressStorage(kopf.AnnotationsProgressStorage):
    """Handler progress in annotations, as before; a record stored and purged in one cycle writes nothing."""

    def purge(self, *, key: kopf.HandlerId, body: kopf.Body, patch: kopf.Patch) -> None:
        super().purge(key=key, body=body, patch=patch)
        marker = f"{self.prefix}/{MARKER}"
        meta: dict[str, Any] = patch.get("metadata") or {}
        annotations: dict[str, Any] = meta.get("annotations") or {}
        ours = [name for name in annotations if name.startswith(f"{self.prefix}/") and name != marker]
        if marker in annotations and marker not in body.metadata.annotations and not ours:
            del annotations[marker]
            if not annotations:
                del meta["annotations"]
            if not meta:
                del patch["metadata"]


class DiffBaseStorage(kopf.MultiDiffBaseStorage):
    """The last handled spec in `status.kopf`, falling back to the annotation of older operators."""

    def __init__(self, *, prefix: str) -> None:
        self.status = kopf.StatusDiffBaseStorage(name=STATUS_NAME)
        self.legacy = kopf.AnnotationsDiffBaseStorage(prefix=prefix, key=DIFFBASE_KEY)
        super().__init__([self.status, self.legacy])  # read in this order

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self.status.store(body=body, patch=patch, essence=essence)
        for key in self.legacy.make_keys(DIFFBASE_KEY, body=body):
            if key in body.metadata.annotations:  # moved to the status: a stale copy must not outlive it
                patch.metadata.annotations[key] = None
