"""The periodic sweeps that replace Celery Beat: stale environments, lost namespaces, orphans,
stuck deletions. (The retries of Failed environments are in retries.py.)

One sweep covers the whole cluster with a fixed number of API calls (one list of Ephemera's
namespaces) plus one call per object that needs action, so an idle environment costs nothing but
its entry in memory.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field

from ephemera.api.models import GROUP, KIND, Phase, parse_time
from ephemera.api.naming import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    OWNER_UID_ANNOTATION,
    PR_LABEL,
    REPOSITORY_ANNOTATION,
    environment_names,
    shard_of,
)
from ephemera.environments import ROLLING_OUT, Environment, Environments, Failure
from ephemera.kube import KubeError, Obj
from ephemera.shards import ours
from ephemera.watchcache import Seen

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    stale: int = 0
    recreated: int = 0
    orphans: int = 0
    stuck_deletions: int = 0
    # What was done to which object (or would have been, in a dry run), for `ephemera jobs run sweep`.
    actions: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stale or self.recreated or self.orphans or self.stuck_deletions)


def _age(since: str | None, now: datetime.datetime) -> float:
    then = parse_time(since)
    return (now - then).total_seconds() if then else 0.0


def made_by_ephemera(namespace: Obj, prefix: str) -> tuple[str, str] | None:
    """The (name, uid) of the PreviewEnvironment that made this namespace, if it bears every mark
    the operator puts on one: Ephemera's label, the uid annotation, a single owner reference to a
    PreviewEnvironment with that very uid, and the name `environment_name` gives its repository
    annotation and PR label (the current form or the legacy 8-hex one). Else None: not ours to judge."""
    meta = namespace["metadata"]
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    uid = annotations.get(OWNER_UID_ANNOTATION)
    if labels.get(MANAGED_BY_LABEL) != MANAGED_BY or not uid:
        return None
    refs = meta.get("ownerReferences") or []
    if len(refs) != 1:
        return None
    ref = refs[0]
    if ref.get("kind") != KIND or not str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
        return None
    if ref.get("uid") != uid or not ref.get("name"):
        return None
    repository, pull_request = annotations.get(REPOSITORY_ANNOTATION), labels.get(PR_LABEL, "")
    if not repository or not pull_request.isdigit():
        return None
    if meta.get("name") not in environment_names(repository, int(pull_request), prefix):
        return None
    return str(ref["name"]), str(uid)


class Sweeper:
    def __init__(
        self, service: Environments, selector: str = f"{MANAGED_BY_LABEL}={MANAGED_BY}", *, dry_run: bool = False
    ) -> None:
        self.service = service
        self.kube = service.kube
        self.settings = service.settings
        self.selector = selector  # the namespaces the sweep reads: Ephemera's label
        self.dry_run = dry_run  # judge everything as usual, change nothing
        self._actions: list[str] = []

    def _act(self, action: str) -> bool:
        """Note `action`; whether to carry it out (not in a dry run)."""
        self._actions.append(action)
        return not self.dry_run

    def sweep(self, seen: dict[str, Seen]) -> SweepReport:
        self._actions = []
        report = SweepReport(actions=self._actions)
        now = datetime.datetime.now(datetime.UTC)
        threshold = self.settings.stale_threshold
        for name, item in list(seen.items()):
            try:
                if item.phase in (Phase.PROVISIONING.value, Phase.UPDATING.value) and not item.deleting:
                    if _age(item.since, now) > threshold and item.reason != ROLLING_OUT:
                        report.stale += self._fail_stale(name, item)
                elif item.deleting and _age(item.deleted_at, now) > threshold:
                    # Timed from the deletion itself: while a teardown waits for its namespace, its
                    # object's later events (the Destroying status) reach the watch only afterwards.
                    report.stuck_deletions += self._unstick(name)
            except (KubeError, Failure) as err:
                log.warning("sweep of %s failed: %s", name, err)
        try:
            namespaces = self.kube.list_namespaces(self.selector)
        except KubeError as err:
            log.warning("sweep could not list namespaces: %s", err)
            return report
        by_name = {ns["metadata"]["name"]: ns for ns in namespaces}
        report.recreated = self._recreate_missing(seen, by_name)
        report.orphans = self._delete_orphans(seen, namespaces, now)
        return report

    def _body(self, name: str, uid: str, *, any_shard: bool = False) -> Obj | None:
        """The object as it is now; None if it is gone, replaced, or (unless `any_shard`) moved to
        another shard since the watch told us of it (its new shard acts on it from then on)."""
        body = self.kube.get_environment(name)
        if body is None or body["metadata"]["uid"] != uid:
            return None
        return body if any_shard or ours(body, self.settings) else None

    def _fail_stale(self, name: str, item: Seen) -> int:
        body = self._body(name, item.uid)
        if body is None:
            return 0
        env = Environment.from_body(body)
        if env.status.phase not in (Phase.PROVISIONING, Phase.UPDATING) or env.status.reason == ROLLING_OUT:
            return 0  # settled meanwhile, or an app rolling out: its own deadline (the template's timeout) governs
        failure = Failure(
            "Stale",
            f"Stuck in {env.status.phase.value} for more than {self.settings.stale_threshold:.0f} s "
            "(EPHEMERA_STALE_THRESHOLD); see the Events for the cause. It is retried automatically.",
        )
        if self._act(f"stale: {name} failed after {env.status.phase.value} for too long"):
            self.service.fail(env, failure)
        return 1

    def _unstick(self, name: str) -> int:
        """Delete a stuck namespace again, and say what holds it."""
        body = self.kube.get_environment(name)
        if body is None:
            return 0
        env = Environment.from_body(body)
        namespace = env.status.namespace or env.namespace(self.settings.namespace_prefix)
        existing = self.kube.get_namespace(namespace)
        if existing is None or not self.service.owns(env, existing):
            return 0
        if self._act(f"stuck deletion: namespace {namespace} of {name} deleted again"):
            self.kube.delete_namespace(namespace, existing["metadata"]["uid"])
            self.service.report_stuck(env, [namespace], self.settings.stale_threshold, "EPHEMERA_STALE_THRESHOLD")
        return 1

    def _recreate_missing(self, seen: dict[str, Seen], namespaces: dict[str, Obj]) -> int:
        recreated = 0
        owned = {(ns["metadata"].get("annotations") or {}).get(OWNER_UID_ANNOTATION) for ns in namespaces.values()}
        for name, item in list(seen.items()):
            if item.phase != Phase.READY.value or item.deleting:
                continue
            # Cheap check first: the namespace of a Ready object carries its uid.
            if item.uid in owned:
                continue
            body = self._body(name, item.uid)
            if body is None:
                continue
            env = Environment.from_body(body)
            if env.status.phase is not Phase.READY or (env.status.namespace or "") in namespaces:
                continue
            if not self._act(f"lost namespace: {name}'s namespace re-created"):
                recreated += 1
                continue
            try:
                self.service.provision(env, updating=True, logger=log)
                recreated += 1
            except Failure as failure:
                if failure.permanent:
                    self.service.fail(env, failure)
                log.warning("could not re-create the namespace of %s: %s", name, failure.message)
        return recreated

    def _delete_orphans(self, seen: dict[str, Seen], namespaces: list[Obj], now: datetime.datetime) -> int:
        """Delete the namespaces Ephemera made (every mark of `made_by_ephemera`) whose PreviewEnvironment
        the API confirms is gone; any doubt (a failed lookup) leaves them for the next sweep."""
        known = {item.uid for item in seen.values()}
        listed: set[str] | None = None  # uids of every PreviewEnvironment, read once if a lookup needs it
        deleted = 0
        for ns in namespaces:
            meta = ns["metadata"]
            owner = made_by_ephemera(ns, self.settings.namespace_prefix)
            if owner is None or owner[1] in known or meta.get("deletionTimestamp"):
                continue  # not made by Ephemera (not ours to touch), its object lives, or it is going
            repository = (meta.get("annotations") or {}).get(REPOSITORY_ANNOTATION, "")
            if self.settings.shards > 1 and shard_of(repository, self.settings.shards) != self.settings.shard:
                continue  # another shard's to judge (this one's watch does not hold its object)
            created = parse_time(meta.get("creationTimestamp"))
            # A young namespace is never judged: its object may not be visible to this operator yet.
            if created is None or (now - created).total_seconds() < self.settings.stale_threshold:
                continue
            name, uid = owner
            try:
                if self._body(name, uid, any_shard=True) is not None:
                    continue  # its object exists (perhaps still labelled for another shard, or not seen yet)
                if listed is None:
                    # By name it is gone; no object under another name may hold the uid either.
                    listed = {str(obj["metadata"]["uid"]) for obj in self.kube.list_environments()}
            except KubeError as err:
                log.warning("orphan check of namespace %s skipped: %s", meta["name"], err)
                return deleted
            if uid in listed:
                continue
            if self._act(f"orphan: namespace {meta['name']} deleted (its PreviewEnvironment {name} is gone)"):
                log.warning(
                    "deleting orphan namespace %s (its PreviewEnvironment %s %s is gone)", meta["name"], name, uid
                )
                self.kube.delete_namespace(meta["name"], meta["uid"])
            deleted += 1
        return deleted
