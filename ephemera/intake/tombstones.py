"""Closed PRs, remembered in the cluster so that a replayed or late event cannot resurrect them.

A closed PR's environment is deleted, and with it the `updated_at` that judged later events. A
record of the close must outlive it and be seen by every webhook replica, including one that just
started: one ConfigMap per repository in the webhook's own namespace, named by a hash of the
repository, maps each closed PR number to the `updated_at` of its close. Entries older than the
retention are pruned on each write, and the newest `max_entries` at most are kept, so that a
ConfigMap stays far below the API server's 1 MiB object limit. Writes carry the resourceVersion they
read and are retried on a conflict, so replicas closing PRs of one repository at once lose none.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ephemera.api.models import parse_time
from ephemera.api.naming import MANAGED_BY, MANAGED_BY_LABEL, REPOSITORY_ANNOTATION
from ephemera.intake.mirror import UNKNOWN, Mirror
from ephemera.kube import Kube, KubeError, Obj

COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT = "closed-pull-requests"
NAME_PREFIX = "ephemera-closed-"
# About 80 bytes an entry: 5,000 keep a ConfigMap under 400 KiB, far below the 1 MiB limit. A
# repository that closes more PRs than that within the retention loses the oldest records first.
MAX_ENTRIES = 5000
# Conflicting writes come only from other replicas (a replica's own threads take turns, below), so a
# few attempts with a short random pause resolve them.
ATTEMPTS = 20
LOCK_STRIPES = 64
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

log = logging.getLogger(__name__)


def default_namespace() -> str:
    """The pod's own namespace in a cluster; `default` elsewhere (local runs and tests)."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def config_map_name(repository: str) -> str:
    """The ConfigMap of one repository: GitHub treats owner and name case-insensitively, so does the hash."""
    return NAME_PREFIX + hashlib.sha256(repository.lower().encode()).hexdigest()[:24]


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def newer(a: str, b: str | None) -> bool:
    """Whether timestamp `a` is strictly later than `b` (a missing `b` is older than anything)."""
    ta, tb = parse_time(a), parse_time(b)
    return tb is None or (ta is not None and ta > tb)


class Tombstones:
    """Closed PRs per repository, kept in ConfigMaps that every replica reads and writes."""

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        retention: float,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.retention = retention
        self.clock = clock
        self.max_entries = max_entries
        self.mirror: Mirror | None = None
        # Threads of this replica that close PRs of one repository write one ConfigMap: they take
        # turns rather than conflict. Striped, so the locks stay few however many repositories come.
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        # The closes this replica recorded that its mirror may not hold yet: (repository, PR) to the
        # `updated_at` recorded. Kept until the mirror holds as late a close (milliseconds).
        self._own: dict[tuple[str, int], str] = {}
        self._own_lock = threading.Lock()

    def mirrored(self) -> Mirror:
        """A mirror of this namespace's records (`start` it; `closed_at` reads it while it is live).

        A close this replica records is read at once (`add` keeps it until the mirror holds it): a
        storm that brings a PR's close first and an older reopen next must not find the mirror
        behind. A close that another replica records reaches the mirror as fast as the API server's
        watch delivers it (milliseconds; this watch carries only closes). That is soon enough: the
        close is recorded before its environment is deleted, and until the operator has torn that
        down (seen the delete, deleted the namespace, seen it gone, removed its finalizer: each
        through a watch of the same API server), a late event for the PR finds the environment
        itself, which refuses it (Intake._stale). Only a close that comes before any event that made
        the environment, at one replica, with an older event of the PR at another within those
        milliseconds, could pass."""
        selector = f"{MANAGED_BY_LABEL}={MANAGED_BY},{COMPONENT_LABEL}={COMPONENT}"
        path = f"/api/v1/namespaces/{self.namespace}/configmaps"
        self.mirror = Mirror(self.kube, path, selector, "closed PRs", _trimmed)
        return self.mirror

    def closed_at(self, repository: str, pull_request: int) -> str | None:
        """The `updated_at` of the PR's latest known close, or None if none is remembered."""
        name = config_map_name(repository)
        obj = self.mirror.get(name) if self.mirror is not None else UNKNOWN
        if obj is UNKNOWN:
            obj = self.kube.get_config_map(self.namespace, name)
        recorded = None if obj is None else self._close_in(obj, repository, pull_request)
        with self._own_lock:
            own = self._own.get((repository.lower(), pull_request))
        return own if own is not None and newer(own, recorded) else recorded

    def blocks(self, repository: str, pull_request: int, updated_at: str) -> bool:
        """Whether an event of `updated_at` is not later than the PR's remembered close."""
        closed = self.closed_at(repository, pull_request)
        return closed is not None and not newer(updated_at, closed)

    def add(self, repository: str, pull_request: int, updated_at: str) -> None:
        """Remember a close; the latest one counts (closes can be delivered in any order).

        Raises KubeError when the API server cannot be reached, or after ATTEMPTS conflicts in a row.
        """
        name = config_map_name(repository)
        with self._locks[int(name[len(NAME_PREFIX) :], 16) % LOCK_STRIPES]:
            recorded = self._add(repository, name, pull_request, updated_at)
        if self.mirror is None:
            return  # `closed_at` reads the API server, which holds it
        with self._own_lock:
            self._own[(repository.lower(), pull_request)] = recorded
            self._forget_mirrored(self.mirror)

    def unmirrored(self) -> int:
        """How many closes this replica recorded that it keeps until its mirror holds them."""
        with self._own_lock:
            return len(self._own)

    def _forget_mirrored(self, mirror: Mirror) -> None:
        """Drop the closes of this replica that its live mirror holds (a close there is never undone:
        only a later one replaces it, and the retention's pruning comes days after)."""
        if not mirror.live:
            return  # `closed_at` reads the API server meanwhile, which holds them all
        for (repository, pull_request), updated_at in list(self._own.items()):
            obj = mirror.get(config_map_name(repository))
            if obj is UNKNOWN or obj is None:
                continue
            mirrored = self._close_in(obj, repository, pull_request)
            if mirrored is not None and not newer(updated_at, mirrored):
                del self._own[(repository, pull_request)]

    def _close_in(self, obj: Obj, repository: str, pull_request: int) -> str | None:
        """The `updated_at` of the PR's close in the ConfigMap `obj`, if it is the repository's and has one."""
        entry = _entries(obj).get(str(pull_request)) if self._for(obj, repository) else None
        return None if entry is None else str(entry["updatedAt"])

    def _add(self, repository: str, name: str, pull_request: int, updated_at: str) -> str:
        """Record the close; the `updated_at` of the latest close recorded for the PR after it."""
        attempts = 0
        while True:
            attempts += 1
            obj = self.kube.get_config_map(self.namespace, name)
            if obj is not None and not self._for(obj, repository):
                # A hash collision of 96 bits, or a hand-made object: never overwrite what is not ours.
                raise KubeError(f"ConfigMap {self.namespace}/{name} belongs to another repository", temporary=False)
            entries = {} if obj is None else _entries(obj)
            known = entries.get(str(pull_request))
            if known is not None and not newer(updated_at, str(known["updatedAt"])):
                return str(known["updatedAt"])
            now = self.clock()
            entries[str(pull_request)] = {"updatedAt": updated_at, "recordedAt": _iso(now)}
            body = self._body(repository, name, self._pruned(entries, now))
            try:
                if obj is None:
                    self.kube.create_config_map(body)
                else:
                    body["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
                    self.kube.replace_config_map(body)
                return updated_at
            except KubeError as err:
                # 409: another replica wrote (or created) it since we read it: read again and merge.
                if err.status != 409 or attempts >= ATTEMPTS:
                    raise
                time.sleep(random.uniform(0, 0.01 * attempts))  # let the other replica's write land

    def _pruned(self, entries: dict[str, dict[str, Any]], now: float) -> dict[str, dict[str, Any]]:
        """The entries recorded within the retention, the newest MAX_ENTRIES at most."""
        recorded = {pr: _recorded(entry) for pr, entry in entries.items()}
        kept = [pr for pr in entries if recorded[pr] >= now - self.retention]
        kept.sort(key=lambda pr: recorded[pr], reverse=True)
        return {pr: entries[pr] for pr in kept[: self.max_entries]}

    def _for(self, obj: Obj, repository: str) -> bool:
        annotations = obj["metadata"].get("annotations") or {}
        return str(annotations.get(REPOSITORY_ANNOTATION, "")).lower() == repository.lower()

    def _body(self, repository: str, name: str, entries: dict[str, dict[str, Any]]) -> Obj:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY, COMPONENT_LABEL: COMPONENT},
                "annotations": {REPOSITORY_ANNOTATION: repository.lower()},
            },
            "data": {pr: json.dumps(entry, separators=(",", ":")) for pr, entry in sorted(entries.items())},
        }


def _trimmed(obj: Obj) -> Obj:
    """What `closed_at` reads of a record: its name, its repository and its entries (no managed fields)."""
    meta = obj["metadata"]
    return {"metadata": {"name": meta["name"], "annotations": meta.get("annotations") or {}}, "data": obj.get("data")}


def _recorded(entry: dict[str, Any]) -> float:
    moment = parse_time(str(entry["recordedAt"]))
    assert moment is not None  # _entries keeps only entries with both times
    return moment.timestamp()


def _entries(obj: Obj) -> dict[str, dict[str, Any]]:
    """The valid entries of a ConfigMap; one edited by hand into nonsense is skipped, and said so."""
    entries: dict[str, dict[str, Any]] = {}
    for pr, text in (obj.get("data") or {}).items():
        try:
            entry = json.loads(text)
            if parse_time(entry["updatedAt"]) is None or parse_time(entry["recordedAt"]) is None:
                raise ValueError("empty time")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            log.warning("skipping a malformed closed-PR entry %s in %s: %s", pr, obj["metadata"]["name"], err)
            continue
        entries[pr] = entry
    return entries
