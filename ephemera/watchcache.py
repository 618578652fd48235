"""What the operator's watches keep in memory, so that the periodic jobs and the handlers ask the API
server nothing to know it: each PreviewEnvironment as last seen (`Seen`), and the namespaces seen
gone (`Vanishing`), which teardowns wait on instead of polling.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ephemera.api.models import Phase


@dataclass(frozen=True, slots=True)  # one per environment: thousands of them
class Seen:
    """What the operator knows of one object from its watch, without asking the API."""

    uid: str
    phase: str
    since: str | None  # lastTransitionTime
    deleted_at: str | None  # deletionTimestamp
    failed_at: str | None = None
    retries: int = 0
    permanent: bool = False
    reason: str | None = None
    repository: str | None = None  # spec.repository: which PreviewTemplate the object matches
    template: str | None = None  # status.template.name: the PreviewTemplate its app came from
    template_generation: int | None = None  # status.template.generation

    @classmethod
    def from_body(cls, obj: Mapping[str, Any]) -> Seen:
        """What a watch event's object says, kept in memory. The values that thousands of objects share
        (phase, reason, repository, template) are kept once each, not once per object."""
        meta, status = obj["metadata"], obj.get("status") or {}
        template = status.get("template") or {}
        return cls(
            uid=meta["uid"],
            phase=_shared(status.get("phase")) or Phase.PENDING.value,
            since=status.get("lastTransitionTime"),
            deleted_at=meta.get("deletionTimestamp"),
            failed_at=status.get("failedAt"),
            retries=int(status.get("retries") or 0),
            permanent=bool(status.get("permanent")),
            reason=_shared(status.get("reason")),
            repository=_shared((obj.get("spec") or {}).get("repository")),
            template=_shared(template.get("name")),
            template_generation=template.get("generation"),
        )

    @property
    def deleting(self) -> bool:
        return self.deleted_at is not None

    def retry_status(self) -> dict[str, Any]:
        return {"phase": self.phase, "failedAt": self.failed_at, "retries": self.retries, "permanent": self.permanent}


def _shared(value: Any) -> Any:
    """One copy of a string that many objects hold (a str from a watch event is a new copy each time)."""
    return sys.intern(value) if type(value) is str else value


class Vanishing:
    """Namespaces the watch saw deleted, by uid: a teardown waits on them instead of polling."""

    def __init__(self, remember: int = 10_000) -> None:
        self._gone: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._remember = remember

    def gone(self, uid: str) -> None:
        self._gone[uid] = None
        while len(self._gone) > self._remember:
            self._gone.popitem(last=False)
        for waiter in self._waiters.pop(uid, []):
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, uid: str, within: float) -> bool:
        """Whether the namespace with `uid` went within `within` seconds (or had gone already)."""
        if uid in self._gone:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(uid, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, within)
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(uid, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(uid, None)
