"""What the lifecycle policy knows of every PreviewEnvironment, kept from the operator's watch.

The caps, the queue and the expiry are decided from this alone, so that an idle environment costs no
API call. It is filled once from a listing when the operator starts (before any handler runs, so that
the first admission already counts every live environment) and kept current by the watch. Nothing in
it is the truth: the queue is the objects in phase Queued, ordered by their priority label, creation
and `status.queuedAt`, so a restarted operator finds it again on the objects.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ephemera.api.models import Phase, parse_time
from ephemera.api.naming import (
    EXPIRES_AT_ANNOTATION,
    KEEP_ANNOTATION,
    KEEP_LABEL_ANNOTATION,
    PRIORITY_LABEL,
    SHARD_LABEL,
    WAKE_ANNOTATION,
)

# Phases of an environment that holds (or is getting) a namespace: what the caps count.
LIVE = frozenset({Phase.PROVISIONING.value, Phase.READY.value, Phase.UPDATING.value, Phase.FAILED.value})
# Phases the expiry acts on: settled ones (a rollout under way is left to finish first).
EXPIRABLE = frozenset({Phase.READY.value, Phase.FAILED.value})
# How long an admission counts before the watch shows its object Provisioning (a provision that
# failed before its first status write would otherwise hold a slot forever).
RESERVATION_SECONDS = 120.0


def kept(annotations: dict[str, str]) -> bool:
    """Pinned: the `ephemera.dev/keep` annotation (any value but "false") or the PR's `preview-keep` label."""
    value = annotations.get(KEEP_ANNOTATION)
    by_hand = value is not None and value.strip().lower() != "false"
    return by_hand or annotations.get(KEEP_LABEL_ANNOTATION) == "true"


def iso(moment: datetime.datetime) -> str:
    """A time as the status holds it (RFC 3339, seconds, UTC)."""
    return moment.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def iso_precise(moment: datetime.datetime) -> str:
    """A time to the microsecond (orders the queue within one second)."""
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)  # one per environment: thousands of them
class Entry:
    """One object, as far as the policy needs it."""

    name: str
    uid: str
    phase: str | None
    repository: str
    created: str
    deleting: bool = False
    priority: bool = False
    kept: bool = False
    extended_to: str | None = None  # the ephemera.dev/expires-at annotation
    wake: str | None = None  # the ephemera.dev/wake annotation
    wake_request: str | None = None  # status.wakeRequest: the wake last acted on
    queued_at: str | None = None
    queue_position: int | None = None
    last_activity_at: str | None = None
    provisioned_at: str | None = None
    expires_at: str | None = None  # as the status says it
    shard: str | None = None  # its ephemera.dev/shard label

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Entry:
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        annotations = dict(meta.get("annotations") or {})
        position = status.get("queuePosition")
        return cls(
            name=str(meta.get("name")),
            uid=str(meta.get("uid")),
            phase=status.get("phase"),
            repository=str((body.get("spec") or {}).get("repository") or "").lower(),
            created=str(meta.get("creationTimestamp") or ""),
            deleting=bool(meta.get("deletionTimestamp")),
            priority=(meta.get("labels") or {}).get(PRIORITY_LABEL) == "true",
            kept=kept(annotations),
            extended_to=annotations.get(EXPIRES_AT_ANNOTATION),
            wake=annotations.get(WAKE_ANNOTATION),
            wake_request=status.get("wakeRequest"),
            queued_at=status.get("queuedAt"),
            queue_position=position if isinstance(position, int) else None,
            last_activity_at=status.get("lastActivityAt"),
            provisioned_at=status.get("provisionedAt"),
            expires_at=status.get("expiresAt"),
            shard=(meta.get("labels") or {}).get(SHARD_LABEL),
        )

    @property
    def live(self) -> bool:
        return self.phase in LIVE and not self.deleting

    @property
    def queued(self) -> bool:
        return self.phase == Phase.QUEUED.value and not self.deleting

    @property
    def provisioning(self) -> bool:
        return self.phase == Phase.PROVISIONING.value and not self.deleting

    def order(self) -> tuple[int, str, str, str]:
        """Its place in the queue: priority first, then first in (creation, then the moment it was
        queued, which tells apart objects created in the same second), then the name."""
        return (0 if self.priority else 1, self.created, self.queued_at or "", self.name)

    def expiry(self, ttl: float) -> datetime.datetime | None:
        """When it expires if nothing happens: its last activity (a push, a wake; else its first Ready,
        else its creation) plus `ttl`, or the expires-at annotation if that is later. None when kept or
        without a TTL. An annotation that is not a time is ignored (the TTL still holds)."""
        if self.kept or ttl <= 0:
            return None
        since = parse_time(self.last_activity_at) or parse_time(self.provisioned_at) or parse_time(self.created)
        if since is None:
            return None
        at = since + datetime.timedelta(seconds=ttl)
        try:
            extended = parse_time(self.extended_to)
        except ValueError:
            extended = None
        if extended is not None and extended.tzinfo is not None and extended > at:
            at = extended
        return at


class Ledger:
    """Every object's Entry, and the admissions made but not yet seen on the watch (thread-safe: the
    handlers that admit run in kopf's threads, the jobs in others).

    `shard`: the value of the shard label on the objects this operator acts on (None: unsharded, every
    object). A sharded operator's listings hold every shard's objects and its watch only its own, so
    the other shards' are known as of the last listing: they count towards the cluster-wide cap, but
    the queue, the expiry and the provisions in flight are of this shard's objects alone (its
    admission and expiry must never act on an object another shard owns)."""

    def __init__(self, shard: str | None = None) -> None:
        self.shard = shard
        self.lock = threading.RLock()  # held across a decision and its reservation
        self._entries: dict[str, Entry] = {}
        self._reserved: dict[str, tuple[float, str]] = {}  # name -> (monotonic deadline, repository)
        self._seen: dict[str, float] = {}  # name -> monotonic time of the watch event last applied
        # Kept as the entries change, so that a decision, a round and the gauges cost what the queue
        # and the reservations hold, not a pass over every environment (thousands, every 5 s).
        self._live = 0
        self._live_by_repository: dict[str, int] = {}
        self._provisioning = 0
        self._queued: set[str] = set()
        self.version = 0  # moves on every change of an entry: a round can tell that nothing changed

    def _put(self, entry: Entry) -> None:
        """Set an entry (in its place, if it had one), keeping the counts and the queue's index (the
        lock held)."""
        old = self._entries.get(entry.name)
        if old is not None:
            self._count(old, -1)
        self._entries[entry.name] = entry
        self._count(entry, 1)
        self.version += 1

    def _drop(self, name: str) -> None:
        """Remove an entry if there is one, keeping the counts and the queue's index (the lock held)."""
        old = self._entries.pop(name, None)
        if old is not None:
            self._count(old, -1)
            self.version += 1

    def mine(self, entry: Entry) -> bool:
        """Whether this operator acts on the entry's object (see the class)."""
        return self.shard is None or entry.shard == self.shard

    def _count(self, entry: Entry, sign: int) -> None:
        if entry.live:
            self._live += sign
            left = self._live_by_repository.get(entry.repository, 0) + sign
            if left:
                self._live_by_repository[entry.repository] = left
            else:
                del self._live_by_repository[entry.repository]
        if not self.mine(entry):
            return
        if entry.provisioning:
            self._provisioning += sign
        if entry.queued and sign > 0:
            self._queued.add(entry.name)
        elif entry.queued:
            self._queued.discard(entry.name)

    def prime(self, bodies: Iterable[dict[str, Any]]) -> int:
        with self.lock:
            for body in bodies:
                entry = Entry.from_body(body)
                if entry.name not in self._entries:
                    self._put(entry)
            return len(self._entries)

    def observe(self, kind: str | None, body: dict[str, Any]) -> None:
        """One watch event of a PreviewEnvironment."""
        name = str((body.get("metadata") or {}).get("name"))
        with self.lock:
            self._seen[name] = time.monotonic()
            if kind == "DELETED":
                self._drop(name)
                self._reserved.pop(name, None)
                return
            entry = Entry.from_body(body)
            self._put(entry)
            if entry.phase not in (None, Phase.PENDING.value, Phase.QUEUED.value, Phase.EXPIRED.value):
                self._reserved.pop(name, None)  # the watch counts it from here

    def resync(self, bodies: Iterable[dict[str, Any]], started: float) -> int:
        """Bring the ledger to a listing begun at `started` (monotonic): drop what the listing no longer
        has (deleted while this replica's watch was paused, as a standby's is) and take what it says,
        except where the watch told something newer since. How many entries were dropped."""
        listed = {entry.name: entry for entry in map(Entry.from_body, bodies)}
        with self.lock:
            stale = [name for name in self._entries if name not in listed and self._seen.get(name, 0.0) < started]
            for name in stale:
                self._drop(name)
                self._seen.pop(name, None)
            for name, entry in listed.items():
                if self._seen.get(name, 0.0) < started:
                    self._put(entry)
            for name in [name for name in self._seen if name not in self._entries and self._seen[name] < started]:
                del self._seen[name]
            return len(stale)

    def get(self, name: str) -> Entry | None:
        with self.lock:
            return self._entries.get(name)

    def entries(self) -> list[Entry]:
        with self.lock:
            return list(self._entries.values())

    def own(self) -> list[Entry]:
        """The entries of the objects this operator acts on (every entry when unsharded)."""
        with self.lock:
            return [entry for entry in self._entries.values() if self.mine(entry)]

    def reserve(self, name: str, repository: str) -> None:
        with self.lock:
            self._reserved[name] = (time.monotonic() + RESERVATION_SECONDS, repository.lower())

    def release(self, name: str) -> None:
        with self.lock:
            self._reserved.pop(name, None)

    def reserved(self) -> set[str]:
        with self.lock:
            now = time.monotonic()
            for name in [name for name, (until, _) in self._reserved.items() if until < now]:
                del self._reserved[name]
            return set(self._reserved)

    def counts(self) -> Counts:
        """Live environments (in all and per repository) and provisions in flight, admissions included."""
        with self.lock:
            live, in_flight = self._live, self._provisioning
            by_repository = dict(self._live_by_repository)
            # An admission counts until the watch shows its object Provisioning: added to the counts
            # kept of the entries where its entry does not count yet. One whose object the watch has
            # not shown at all (a create handler runs before the policy's own watch handler may have
            # seen the object) counts under the repository of its reservation.
            for name in self.reserved():
                entry = self._entries.get(name)
                repository = self._reserved[name][1] if entry is None else entry.repository
                if entry is None or not entry.live:
                    live += 1
                    by_repository[repository] = by_repository.get(repository, 0) + 1
                if entry is None or not entry.provisioning:
                    in_flight += 1
            return Counts(live, by_repository, in_flight)

    def queue(self) -> list[Entry]:
        """The Queued objects, in the order they are admitted."""
        with self.lock:
            return sorted((self._entries[name] for name in self._queued), key=Entry.order)


@dataclass
class Counts:
    live: int
    by_repository: dict[str, int]
    in_flight: int


def note(obj: dict[str, Any]) -> str:
    """What the policy says of one object, for listings: its place in the queue, when it expires
    (or expired), or that it is kept; `-` when none applies."""
    status = obj.get("status") or {}
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    phase = status.get("phase")
    if phase == Phase.QUEUED.value:
        position = status.get("queuePosition")
        return f"queued #{position}" if position else "queued"
    if phase == Phase.EXPIRED.value:
        return f"expired {status['expiresAt']}" if status.get("expiresAt") else "expired"
    if kept(annotations):
        return "kept"
    return f"expires {status['expiresAt']}" if status.get("expiresAt") else "-"
