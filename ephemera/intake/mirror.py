"""A few objects of one kind, kept in memory by a list and a watch, so that the intake can answer
"is there one?" without a request to the API server for every event.

A mirror answers only while it is live: after a complete list, while its watch runs. Before that,
and from any failure until the next list, `get` says it does not know (the caller then reads the
object as before). A change reaches it as fast as the API server's watch delivers it to any
client (milliseconds), which is what the intake's guards rely on: see `Tombstones` and
`Intake._existing_name` for why that is soon enough for each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ephemera.kube import Kube, Obj

log = logging.getLogger(__name__)

# The API server ends a watch after this long; it is then resumed from the last version it gave.
WATCH_SECONDS = 300
# After a failure (the API server away, a 410 Gone), how long before listing again.
RETRY_DELAY = 2.0
UNKNOWN: Any = object()  # what `get` answers while the mirror is not live


def whole(obj: Obj) -> Obj | None:
    return obj


class Mirror:
    """The objects of the list `path` with the label `selector`, by name, on a thread of its own;
    `keep` trims each to what is read of it, or drops it (None)."""

    def __init__(
        self, kube: Kube, path: str, selector: str, what: str, keep: Callable[[Obj], Obj | None] = whole
    ) -> None:
        self.kube = kube
        self.path = path
        self.selector = selector
        self.what = what
        self.keep = keep
        self._objects: dict[str, Obj] = {}
        self._live = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mirror {what}", daemon=True)

    @property
    def live(self) -> bool:
        return self._live

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop answering at once; the thread ends when its watch does (it is a daemon)."""
        self._stopping.set()
        self._live = False

    def get(self, name: str) -> Obj | None:
        """The object named `name`, None if there is none, UNKNOWN while the mirror is not live."""
        with self._lock:
            return self._objects.get(name) if self._live else UNKNOWN

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                items, version = self.kube.snapshot(self.path, self.what, self.selector)
                kept = ((obj["metadata"]["name"], self.keep(obj)) for obj in items)
                objects = {name: obj for name, obj in kept if obj is not None}
                with self._lock:
                    self._objects = objects
                    self._live = not self._stopping.is_set()
                self._follow(version)
            except Exception as err:  # any failure: not live until listed again
                if self._stopping.is_set():
                    return
                log.warning("mirror of %s not live, listing again: %s", self.what, err)
            self._live = False
            self._stopping.wait(RETRY_DELAY)

    def _follow(self, version: str) -> None:
        """Apply watch events from `version` until the watch fails or expires (then list again)."""
        while not self._stopping.is_set():
            for kind, obj in self.kube.watch(self.path, self.what, self.selector, version, WATCH_SECONDS):
                if kind == "ERROR":  # 410 Gone: the version is too old
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = str(obj["metadata"]["resourceVersion"])
                if kind not in ("ADDED", "MODIFIED", "DELETED"):
                    continue  # a BOOKMARK: only its version
                name, kept = obj["metadata"]["name"], self.keep(obj) if kind != "DELETED" else None
                with self._lock:
                    if kept is None:
                        self._objects.pop(name, None)
                    else:
                        self._objects[name] = kept
