"""The dashboard's view of the cluster: every PreviewEnvironment, kept current by one list and
watch, so that a page costs the API server nothing and a change reaches the open pages at once.

The official client is synchronous: the watch runs on a thread of its own and hands each change to
the event loop, where the objects are kept (only the loop's thread touches them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from kubernetes import client, watch

from ephemera.api.models import GROUP, PLURAL, VERSION

log = logging.getLogger("ephemera.dashboard")

Obj = dict[str, Any]
# The API server ends a watch after this long; it is then resumed from the last resourceVersion.
WATCH_SECONDS = 240
# After a failure (the API server away, a 410 Gone), how long before listing again.
RETRY_DELAY = 2.0


class EnvironmentWatch:
    """The PreviewEnvironments as the API server has them, with a version that grows on each change."""

    def __init__(self, api_client: client.ApiClient, loop: asyncio.AbstractEventLoop) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self._loop = loop
        self.objects: dict[str, Obj] = {}
        self.version = 0
        self.listed = False  # whether a first listing has arrived (/healthz)
        self.error: str | None = None  # the last failure, until the next listing
        self._changed = asyncio.Event()
        self._stopping = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="environment-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()

    async def changed(self, version: int, within: float) -> int:
        """Wait until the version is past `version` (or `within` seconds pass); the version then."""
        if self.version == version:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), within)
        return self.version

    def wake(self) -> None:
        """Release every waiter (at shutdown, so that open event streams end)."""
        self._changed.set()
        self._changed = asyncio.Event()

    # On the loop's thread.
    def _replace(self, items: list[Obj]) -> None:
        self.objects = {obj["metadata"]["name"]: obj for obj in items}
        self.listed, self.error = True, None
        self._bump()

    def _apply(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
        self._bump()

    def _failed(self, message: str) -> None:
        self.error = message

    def _bump(self) -> None:
        self.version += 1
        self.wake()

    # On the watch's thread.
    def _call(self, method: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(method, *args)
        except RuntimeError:  # the loop has closed: the process is stopping
            self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                listing = self._api.list_cluster_custom_object(GROUP, VERSION, PLURAL, _request_timeout=30)
                self._call(self._replace, listing.get("items") or [])
                self._follow(listing["metadata"]["resourceVersion"])
            except Exception as err:  # any failure: say so on the pages, list again shortly
                if self._stopping.is_set():
                    return
                log.warning("watching PreviewEnvironments failed, listing again: %s", err)
                self._call(self._failed, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            self._stopping.wait(RETRY_DELAY)

    def _follow(self, resource_version: str) -> None:
        """Apply watch events from `resource_version` until the watch ends or expires (then return
        to list again)."""
        while not self._stopping.is_set():
            self._watch = watch.Watch()
            for event in self._watch.stream(
                self._api.list_cluster_custom_object,
                GROUP,
                VERSION,
                PLURAL,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=WATCH_SECONDS + 30,
            ):
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":  # 410 Gone: the resourceVersion is too old, list again
                    raise RuntimeError(f"watch error: {obj.get('message') if isinstance(obj, dict) else obj}")
                resource_version = obj["metadata"]["resourceVersion"]
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._call(self._apply, kind, obj)
