"""Expiry: an environment without a push for EPHEMERA_POLICY_TTL loses its namespace and goes Expired.

The object stays, so the PR keeps its place and says how to bring the preview back: a new push (a
spec change) or `/preview wake` from someone with write access revives it through the admission, as
a new environment. `ephemera.dev/keep` (or the PR's `preview-keep` label) pins an environment, and
`ephemera.dev/expires-at` pushes its end further out. The round works from the ledger (the watch):
only an environment due to expire, or whose `status.expiresAt` is out of date, costs API calls.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ephemera.api.models import Phase
from ephemera.config import Settings
from ephemera.environments import Environment, Environments, PermanentFailure
from ephemera.kube import KubeError
from ephemera.ledger import EXPIRABLE, LIVE, Entry, Ledger, iso
from ephemera.policy import Policy, for_repository

log = logging.getLogger(__name__)

# status.expiresAt fields written per round at most (an upgrade finds every object without one).
EXPIRY_WRITES = 100


def duration(seconds: float) -> str:
    """`72 h`, `90 min`, `5 s`: how long the TTL is, for people."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:.0f} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:g} s"


def due(entry: Entry, ttl: float, now: datetime.datetime) -> bool:
    expiry = entry.expiry(ttl)
    return entry.phase in EXPIRABLE and not entry.deleting and expiry is not None and expiry <= now


def wanted(entry: Entry, ttl: float) -> str | None:
    """The expiresAt an object's status should say (None: no expiry)."""
    expiry = entry.expiry(ttl)
    return iso(expiry) if expiry is not None else None


class Lifetimes:
    """The TTL of a repository's previews: its PreviewTemplate's `policy.ttlSeconds`, else the cluster's
    EPHEMERA_POLICY_TTL (the template chosen as the operator and the webhook choose it)."""

    def __init__(self, settings: Settings, templates: Callable[[], Iterable[Mapping[str, Any]]] = list) -> None:
        self.base = Policy.from_settings(settings)
        self.templates = templates

    def __call__(self, repository: str) -> float:
        return for_repository(self.base, self.templates(), repository).ttl


class Expiry:
    def __init__(self, service: Environments, ledger: Ledger, ttl_of: Callable[[str], float]) -> None:
        self.service = service
        self.ledger = ledger
        self.ttl_of = ttl_of
        self.unfinished: dict[str, Environment] = {}  # expired, namespaces not deleted yet
        # Per object, what the last round worked out from its entry and TTL: its expiry, and whether
        # its status.expiresAt says otherwise. An entry is replaced (never changed) on each watch
        # event, so an unchanged one under an unchanged TTL needs no new parsing of its times (the
        # round runs every 5 s over every environment: that parsing was most of an idle operator's CPU).
        self._known: dict[str, tuple[Entry, float, datetime.datetime | None, bool]] = {}
        # After a round that found nothing to do: the ledger's version, the TTLs it used and the first
        # moment anything can expire. Until one of them changes, a round has nothing to find.
        self._quiet: tuple[int, dict[str, float], datetime.datetime] | None = None

    def round(self, now: datetime.datetime | None = None) -> tuple[list[Entry], list[tuple[str, str | None]]]:
        """From the ledger: the objects due to expire, and the expiresAt values to bring up to date."""
        now = now or datetime.datetime.now(datetime.UTC)
        version = self.ledger.version  # read before the entries: a change meanwhile shows next round
        if self._quiet is not None:
            then, ttls_then, first = self._quiet
            if then == version and now < first and all(self.ttl_of(r) == t for r, t in ttls_then.items()):
                return [], []
        self._quiet = None
        expiring: list[Entry] = []
        refresh: list[tuple[str, str | None]] = []
        ttls: dict[str, float] = {}  # per repository, for this round
        known: dict[str, tuple[Entry, float, datetime.datetime | None, bool]] = {}
        first = datetime.datetime.max.replace(tzinfo=datetime.UTC)
        for entry in self.ledger.own():  # another shard's objects are its own to expire
            ttl = ttls.get(entry.repository)
            if ttl is None:
                ttl = ttls[entry.repository] = self.ttl_of(entry.repository)
            last = self._known.get(entry.name)
            if last is not None and last[0] is entry and last[1] == ttl:
                expiry, outdated = last[2], last[3]
            else:
                expiry = entry.expiry(ttl)
                outdated = (iso(expiry) if expiry is not None else None) != entry.expires_at
            known[entry.name] = (entry, ttl, expiry, outdated)
            if entry.phase in EXPIRABLE and not entry.deleting and expiry is not None:
                if expiry <= now:  # due(entry, ttl, now)
                    expiring.append(entry)
                    continue
                first = min(first, expiry)
            if entry.phase not in LIVE or entry.deleting or len(refresh) >= EXPIRY_WRITES:
                continue
            if outdated:
                refresh.append((entry.name, wanted(entry, ttl)))
        self._known = known
        if not expiring and not refresh:
            self._quiet = (version, ttls, first)
        return expiring, refresh

    def expire(self, entry: Entry) -> bool:
        """Expire one object if it is still due as the API server has it: the Expired status first
        (so nothing re-creates the namespace), then its namespaces (only its own) are deleted."""
        body = self.service.kube.get_environment(entry.name)
        if body is None or body["metadata"]["uid"] != entry.uid or body["metadata"].get("deletionTimestamp"):
            return False
        now = datetime.datetime.now(datetime.UTC)
        fresh = Entry.from_body(body)
        ttl = self.ttl_of(fresh.repository)
        if not due(fresh, ttl, now):
            return False  # pushed, kept or extended since the watch told us
        try:
            env = Environment.from_body(body)
        except PermanentFailure:
            return False
        expiry = fresh.expiry(ttl)
        prefix = self.service.settings.namespace_prefix
        namespace = env.namespace(prefix)
        message = (
            f"No push for {duration(ttl)}: expired at {iso(expiry) if expiry else iso(now)} and namespace "
            f"{namespace} deleted. Push a commit, or comment `/preview wake` on the PR, to bring it back."
        )
        cleared: dict[str, Any] = {
            "url": None,
            "template": None,
            "inventory": None,
            "rolloutDeadline": None,
            "failedAt": None,
            "permanent": None,
            "retries": None,
        }
        logger = logging.LoggerAdapter(log, {"repository": env.spec.repository, "pr": env.spec.pull_request})
        env = self.service.transition(env, Phase.EXPIRED, "Idle", message, cleared, logger)
        self.unfinished[env.name] = env
        self.finish()
        return True

    def finish(self) -> None:
        """Delete the namespaces (only their own) of the objects expired: one the API server could not
        delete is tried again on the next round."""
        prefix = self.service.settings.namespace_prefix
        for name, env in list(self.unfinished.items()):
            try:
                for namespace in env.namespaces(prefix):
                    existing = self.service.kube.get_namespace(namespace)
                    if existing is not None and self.service.owns(env, existing):
                        self.service.kube.delete_namespace(namespace, existing["metadata"]["uid"])
            except KubeError as err:
                log.warning("could not delete the namespace of expired %s (tried again next round): %s", name, err)
                continue
            del self.unfinished[name]

    def refresh(self, name: str, expires_at: str | None) -> None:
        self.service.kube.patch_environment_status(name, {"expiresAt": expires_at})
