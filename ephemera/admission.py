"""Caps and fairness: which environments may hold a namespace now, and the queue of the others.

Limits on live environments (cluster-wide and per repository) and on provisions in flight
(EPHEMERA_POLICY_MAX_*; 0 means none). An environment that needs a namespace it does not hold yet
(a new PR, or an Expired one revived) is admitted only if every limit leaves room and nothing ahead of
it in the queue is waiting for that room; otherwise it goes `Queued`, and the periodic admission round
admits the queue as slots free: priority PRs first, then first in. Updates of environments that hold
a namespace are never held back.

Every decision is taken under the ledger's lock, and an admission counts (a reservation) from the
moment it is decided until the watch shows its object Provisioning, so concurrent handlers can never
admit more than the limits. The operator that decides is the one active replica (kopf's peering).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ephemera.api.models import Phase
from ephemera.config import Settings
from ephemera.environments import Environment, Environments, Failure, PermanentFailure
from ephemera.kube import KubeError
from ephemera.ledger import LIVE, Counts, Entry, Ledger, iso, iso_precise

Logger = logging.Logger | logging.LoggerAdapter[Any]
log = logging.getLogger(__name__)

# Queue positions written per round at most (the front first): a long queue moving by one must not
# cost a write per object each round. Those further back are written as they come forward.
POSITION_WRITES = 100


@dataclass(frozen=True)
class Limits:
    total: int = 0
    per_repository: int = 0
    in_flight: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.policy_max_environments,
            settings.policy_max_environments_per_repository,
            settings.policy_max_provisions_in_flight,
        )


@dataclass(frozen=True)
class Hold:
    """Why an environment waits: a CamelCase reason and the sentence the status and the PR show."""

    reason: str
    message: str


def plan(waiting: Sequence[Entry], counts: Counts, limits: Limits) -> tuple[list[str], dict[str, Hold]]:
    """Admit from `waiting` (in queue order) what the limits leave room for; the names admitted, and
    why each other one waits. A candidate whose repository is full is passed over, not a wall: the
    next one, from another repository, may go. Pure: the caller holds the lock and reserves."""
    live, in_flight = counts.live, counts.in_flight
    by_repository = dict(counts.by_repository)
    admitted: list[str] = []
    holds: dict[str, Hold] = {}
    for entry in waiting:
        mine = by_repository.get(entry.repository, 0)
        hold = _hold(limits, live, in_flight, entry.repository, mine)
        if hold is not None:
            holds[entry.name] = hold
            continue
        admitted.append(entry.name)
        live += 1
        in_flight += 1
        by_repository[entry.repository] = mine + 1
    return admitted, holds


def _hold(limits: Limits, live: int, in_flight: int, repository: str, mine: int) -> Hold | None:
    """The first limit that holds a candidate back, as the Hold it shows; None if it may start."""
    checks = (
        (
            limits.in_flight,
            in_flight,
            "ProvisionsInFlight",
            f"Queued: {in_flight} environments are being provisioned "
            f"(EPHEMERA_POLICY_MAX_PROVISIONS_IN_FLIGHT={limits.in_flight}); it starts as they finish.",
        ),
        (
            limits.total,
            live,
            "ClusterLimit",
            f"Queued: {live} live environments in the cluster (EPHEMERA_POLICY_MAX_ENVIRONMENTS="
            f"{limits.total}); it starts when one closes or expires.",
        ),
        (
            limits.per_repository,
            mine,
            "RepositoryLimit",
            f"Queued: {mine} live environments for {repository} (EPHEMERA_POLICY_MAX_ENVIRONMENTS_"
            f"PER_REPOSITORY={limits.per_repository}); it starts when one of them closes or expires.",
        ),
    )
    for limit, count, reason, message in checks:
        if limit and count >= limit:  # a limit of 0 is no limit
            return Hold(reason, message)
    return None


def activity(env: Environment, entry: Entry, ttl: float, now: datetime.datetime, *, force: bool) -> dict[str, Any]:
    """The status fields of a new activity (a new commit, or `force`: a revival): its time and the
    expiry it gives; nothing when neither happened and the clock already runs."""
    new_commit = env.status.commit != env.spec.commit_sha[:7]
    if not (force or new_commit or not env.status.last_activity_at):
        return {}
    expiry = dataclasses.replace(entry, last_activity_at=iso(now)).expiry(ttl)
    return {"lastActivityAt": iso(now), "expiresAt": iso(expiry) if expiry else None}


class Admission:
    """The entry point of every provision: admits, queues, or lets an update through."""

    def __init__(self, service: Environments, ledger: Ledger, ttl_of: Callable[[str], float]) -> None:
        self.service = service
        self.ledger = ledger
        self.ttl_of = ttl_of  # the TTL of a repository's previews (expiry.Lifetimes)
        self.settings = service.settings
        self.limits = Limits.from_settings(service.settings)

    def entry(self, env: Environment) -> Entry:
        """The ledger's entry of `env` (labels, creation), or one made from what the handler has."""
        found = self.ledger.get(env.name)
        if found is not None and found.uid == env.uid:
            return found
        return Entry(
            name=env.name,
            uid=env.uid,
            phase=env.status.phase.value if env.status.phase else None,
            repository=env.spec.repository.lower(),
            created=env.created or "",
        )

    def provision(
        self,
        env: Environment,
        *,
        updating: bool,
        logger: Logger,
        extra: dict[str, Any] | None = None,
        detached: bool = False,
    ) -> None:
        """Provision or update `env` as the policy allows. One that holds a namespace is updated at
        once; one that needs a namespace is admitted or Queued. `detached`: no kopf handler retries
        this call (a wake, the admission round), so an admission that fails ends in the status."""
        now = datetime.datetime.now(datetime.UTC)
        entry = self.entry(env)
        phase = env.status.phase.value if env.status.phase else None
        if phase in LIVE:
            stamp = activity(env, entry, self.ttl_of(env.spec.repository), now, force=False)
            self.service.provision(env, updating=updating, logger=logger, first={**stamp, **(extra or {})} or None)
            return
        queued_at = env.status.queued_at or iso_precise(now)
        me = dataclasses.replace(entry, queued_at=queued_at)
        with self.ledger.lock:
            reserved = self.ledger.reserved()
            waiting = sorted(
                [e for e in self.ledger.queue() if e.name != env.name and e.name not in reserved] + [me],
                key=Entry.order,
            )
            admitted, holds = plan(waiting, self.ledger.counts(), self.limits)
            if env.name in admitted:
                self.ledger.reserve(env.name, env.spec.repository)
        if env.name in admitted:
            if detached:
                self._launch(env, entry, queued_at, logger, extra)
            else:
                self._start(env, entry, now, logger, extra)
            return
        position = [e.name for e in waiting if e.name not in admitted].index(env.name) + 1
        hold = holds[env.name]
        if (
            env.status.phase is Phase.QUEUED
            and env.status.observed_generation == env.generation
            and env.status.queue_position == position
            and not extra
        ):
            return  # nothing new to say
        self.service.transition(
            env,
            Phase.QUEUED,
            hold.reason,
            hold.message,
            {"queuePosition": position, "queuedAt": queued_at, "expiresAt": None, **(extra or {})},
            logger,
        )

    def _start(
        self, env: Environment, entry: Entry, now: datetime.datetime, logger: Logger, extra: dict[str, Any] | None
    ) -> None:
        stamp = activity(env, entry, self.ttl_of(env.spec.repository), now, force=True)
        fields = {**stamp, "queuePosition": None, "queuedAt": None, **(extra or {})}
        # The reservation stays if this fails: the watch frees it once the object leaves the queue
        # (Provisioning, Failed), or its deadline does if even the first status write failed.
        self.service.provision(env, updating=False, logger=logger, first=fields)

    # The periodic round ---------------------------------------------------------------------------

    def round(self) -> tuple[list[Entry], list[tuple[str, int]]]:
        """Decide one admission round from the ledger: the Queued objects admitted now (reserved),
        and the queue positions to write (name, position), the front first."""
        with self.ledger.lock:
            reserved = self.ledger.reserved()
            waiting = [e for e in self.ledger.queue() if e.name not in reserved]
            if not waiting:
                return [], []
            admitted, _ = plan(waiting, self.ledger.counts(), self.limits)
            chosen = set(admitted)
            for entry in waiting:
                if entry.name in chosen:
                    self.ledger.reserve(entry.name, entry.repository)
        starting = [e for e in waiting if e.name in chosen]
        rest = [e for e in waiting if e.name not in chosen]
        moves = [(e.name, i) for i, e in enumerate(rest, 1) if e.queue_position != i][:POSITION_WRITES]
        return starting, moves

    def admit(self, entry: Entry) -> bool:
        """Provision a Queued object the round admitted; whether it started (its failures end in its
        status: see `_launch`)."""
        try:
            body = self.service.kube.get_environment(entry.name)
        except KubeError as err:
            self.ledger.release(entry.name)
            log.warning("could not read %s to admit it: %s", entry.name, err)
            return False
        status = (body or {}).get("status") or {}
        if (
            body is None
            or body["metadata"]["uid"] != entry.uid
            or body["metadata"].get("deletionTimestamp")
            or status.get("phase") != Phase.QUEUED.value
        ):
            self.ledger.release(entry.name)  # gone or changed since: the next round decides anew
            return False
        try:
            env = Environment.from_body(body)
        except PermanentFailure:
            self.ledger.release(entry.name)
            return False
        logger = logging.LoggerAdapter(log, {"repository": env.spec.repository, "pr": env.spec.pull_request})
        try:
            namespace = self.service.kube.get_namespace(env.namespace(self.settings.namespace_prefix))
        except KubeError as err:
            self.ledger.release(entry.name)
            log.warning("could not read the namespace of %s to admit it: %s", entry.name, err)
            return False
        if namespace is not None and namespace["metadata"].get("deletionTimestamp"):
            # Its namespace of before (it expired a moment ago) is still going: a later round starts it,
            # without writing a status for nothing now.
            self.ledger.release(entry.name)
            return False
        self._launch(env, entry, env.status.queued_at or iso_precise(datetime.datetime.now(datetime.UTC)), logger, None)
        return True

    def _launch(
        self, env: Environment, entry: Entry, queued_at: str, logger: Logger, extra: dict[str, Any] | None
    ) -> None:
        """Start an admitted environment where no kopf handler retries: a failure ends in its status.
        A plain wait (its old namespace still terminating, as right after it expired) puts it back in
        the queue at its place, for the next round; another temporary failure leaves it Failed for the
        retry timer; a permanent one, Failed."""
        now = datetime.datetime.now(datetime.UTC)
        try:
            self._start(env, entry, now, logger, extra)
        except Failure as failure:
            body = self.service.kube.get_environment(env.name)
            if body is None or body["metadata"]["uid"] != env.uid:
                return
            current = Environment.from_body(body)
            if failure.permanent:
                self.service.fail(current, failure, logger)
                return
            if failure.backoff:
                fields = {"failedAt": iso(now), "permanent": False}
                self.service.transition(current, Phase.FAILED, failure.reason, failure.message, fields, logger)
                return
            self.ledger.release(env.name)
            message = f"Admitted, waiting to start: {failure.message}"
            fields = {"queuedAt": queued_at, "expiresAt": None}
            self.service.transition(current, Phase.QUEUED, failure.reason, message, fields, logger)

    def write_position(self, name: str, position: int) -> None:
        self.service.kube.patch_environment_status(name, {"queuePosition": position})
