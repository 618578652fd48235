"""The operator-wide periodic jobs, in place of Celery Beat (asyncio tasks, not kopf timers).

One task each for the whole operator, working from what the watch already keeps in memory, so that
an idle environment costs no API call: retries of Failed environments (backoff and cap), the sweep
(stale phases, lost namespaces, orphans), the rollout deadlines, the purge of old records, the
records resync and the phase gauge; and the backstop (`ephemera/backstop.py`), which lists GitHub's
open PRs and so costs requests to GitHub, not to the API server, every EPHEMERA_PR_RESYNC_INTERVAL.
Only the active replica runs them (`is_active`). A person's retry (the `ephemera.dev/retry`
annotation) is a kopf handler in lifecycle.py. `ephemera jobs run` asks for a run of the sweep, the
purge or the retries now (ephemera/ondemand.py): it takes the same lock as the periodic run.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ephemera.api.models import Phase, parse_time
from ephemera.backstop import Backstop
from ephemera.intake.tombstones import default_namespace
from ephemera.kube import Kube, KubeError
from ephemera.ondemand import JobRequest, JobRequests
from ephemera.operator import apps, policy
from ephemera.operator.metrics import ACTIVE, ENVIRONMENTS
from ephemera.operator.runtime import Runtime
from ephemera.retries import retry, retry_due_ones
from ephemera.shards import Strays
from ephemera.sweeps import Sweeper
from ephemera.watchcache import Seen

log = logging.getLogger(__name__)
RETRY_CHECK_INTERVAL = 5.0
ROLLOUT_CHECK_INTERVAL = 10.0


def _alive(peer: dict[str, Any], now: datetime.datetime, *, unknown: bool) -> bool:
    """Whether a peering entry is within its lifetime; `unknown` when it cannot be told."""
    seen = parse_time(peer.get("lastseen"))
    try:
        lifetime = float(peer.get("lifetime", 60))
    except (TypeError, ValueError):
        return unknown
    return unknown if seen is None else (now - seen).total_seconds() < lifetime


def is_active(kube: Kube, peering: str | None, priority: int, identity: str) -> bool:
    """Whether this replica runs the operator-wide jobs: standalone, or its own entry in the peering
    object (kopf's keep-alive, under `identity`) is present and alive and no live peer outranks it.

    A peer outranks it with a higher priority, or with the same priority and a smaller identity: ties
    (which make kopf pause every replica's handlers) still leave exactly one replica running the jobs.
    A missing entry (not written yet, or expired) means not active: two replicas must never both be."""
    if peering is None:
        return True
    body = kube.get_peering(peering)
    status = (body or {}).get("status") or {}
    own = status.get(identity)
    now = datetime.datetime.now(datetime.UTC)
    if not isinstance(own, dict) or not _alive(own, now, unknown=False):
        return False
    rank = (-priority, identity)
    for name, peer in status.items():
        # A peer that cannot be judged counts as alive, as kopf counts it: it may outrank this one.
        if name == identity or not isinstance(peer, dict) or not _alive(peer, now, unknown=True):
            continue
        try:
            peer_priority = int(peer.get("priority", 0))
        except (TypeError, ValueError):
            continue
        if (-peer_priority, str(name)) < rank:
            return False
    return True


async def _every(
    seconds: float, job: Callable[[], Awaitable[None]], name: str, active: Callable[[], Awaitable[bool]]
) -> None:
    while True:
        try:
            if await active():  # a standby replica leaves the operator-wide jobs to the active one
                await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic job %s failed; trying again in %.0f s", name, seconds)
        await asyncio.sleep(seconds)


def start(runtime: Runtime, priority: int, identity: str) -> list[asyncio.Task[None]]:
    """Start the operator-wide jobs; they stop with the operator. `identity` is this replica's name
    in the peering object (kopf's keep-alive)."""
    cfg = runtime.settings
    sweeper = Sweeper(runtime.environments)
    # One run of each job at a time, periodic or asked for (`ephemera jobs run`).
    locks = {"sweep": asyncio.Lock(), "purge": asyncio.Lock(), "retry-failed": asyncio.Lock()}

    async def active() -> bool:
        # Every job asks, the phase gauge every 10 s: the gauge that says so is as fresh as that.
        try:
            now_active = await asyncio.to_thread(is_active, runtime.kube, cfg.peering, priority, identity)
        except KubeError as err:
            log.warning("cannot tell whether this replica is the active one (%s); skipping this round", err)
            now_active = False
        ACTIVE.set(1 if now_active else 0)
        return now_active

    async def retries() -> None:
        seen: dict[str, Seen] = dict(runtime.phases)
        if any(item.phase == Phase.FAILED.value for item in seen.values()):
            async with locks["retry-failed"]:
                await asyncio.to_thread(retry_due_ones, runtime.environments, seen, log)

    async def sweep() -> None:
        seen: dict[str, Seen] = dict(runtime.phases)
        async with locks["sweep"]:
            report = await asyncio.to_thread(sweeper.sweep, seen)
        if report:
            log.info("sweep: %s", report)

    async def rollouts() -> None:
        # A rollout is settled by its workloads' changes; only one that nothing changes any more (stuck
        # short of ready) needs the clock for its deadline.
        for name, item in list(runtime.phases.items()):
            if apps.waiting(item):
                runtime.settler.poke(name)

    async def purge() -> None:
        async with locks["purge"]:
            purged = await runtime.records.purge(datetime.timedelta(seconds=cfg.record_retention), cfg.purge_batch)
        if purged:
            log.info("purged %d destroyed environment record(s) older than %.0f s", purged, cfg.record_retention)

    async def resync() -> None:
        await runtime.records.resync()

    async def gauge() -> None:
        counts: dict[str, int] = {}
        for seen in list(runtime.phases.values()):
            phase = Phase.DESTROYING.value if seen.deleting else seen.phase  # deleted: its teardown is under way
            counts[phase] = counts.get(phase, 0) + 1
        for phase in Phase:
            ENVIRONMENTS.labels(phase.value).set(counts.get(phase.value, 0))

    # The reporter's credentials: one cache of installation tokens and installations per process.
    backstop = Backstop(cfg, runtime.kube, auth=runtime.reporter.auth)

    async def pr_resync() -> None:
        await asyncio.to_thread(backstop.run)

    jobs = [
        (min(cfg.retry_backoff, RETRY_CHECK_INTERVAL), retries, "retries"),
        (cfg.sweep_interval, sweep, "sweep"),
        (ROLLOUT_CHECK_INTERVAL, rollouts, "rollout-deadlines"),
        (cfg.resync_interval, resync, "resync"),
        (10.0, gauge, "phase-gauge"),
    ]
    if cfg.shard == 0:  # the records are shared and their purge is by age alone: one shard does it
        jobs.append((cfg.purge_interval, purge, "purge"))
    if cfg.shards > 1 and cfg.shard == 0:
        strays = Strays(runtime.kube, cfg)

        async def adopt() -> None:
            moved = await asyncio.to_thread(strays.adopt)
            if moved:
                log.info("adopted %d PreviewEnvironment(s) that no shard watched", moved)

        jobs.append((cfg.sweep_interval, adopt, "strays"))
    jobs += policy.jobs(runtime)  # the queue's admissions and the expiry
    if cfg.backstop_enabled:
        jobs.append((cfg.pr_resync_interval, pr_resync, "pr-resync"))
    tasks = [asyncio.create_task(_every(seconds, job, name, active), name=name) for seconds, job, name in jobs]

    async def on_demand(request: JobRequest) -> dict[str, Any]:
        return await run_requested(runtime, request)

    namespace = cfg.backstop_namespace or cfg.webhook_namespace or default_namespace()
    requests = JobRequests(runtime.kube, namespace, on_demand, locks=locks, active=active, identity=identity)
    tasks.append(asyncio.create_task(requests.serve(), name="job-requests"))
    return tasks


async def run_requested(runtime: Runtime, request: JobRequest) -> dict[str, Any]:
    """One requested run of a job (its lock held by the caller): what it did, or would do in a dry run."""
    cfg = runtime.settings
    seen: dict[str, Seen] = dict(runtime.phases)
    if request.job == "sweep":
        report = await asyncio.to_thread(Sweeper(runtime.environments, dry_run=request.dry_run).sweep, seen)
        return {
            "stale": report.stale,
            "stuckDeletions": report.stuck_deletions,
            "recreated": report.recreated,
            "orphans": report.orphans,
            "actions": report.actions,
        }
    if request.job == "purge":
        older_than = datetime.timedelta(seconds=request.older_than or cfg.record_retention)
        if request.dry_run:
            count = await runtime.records.purgeable(older_than)
        else:
            count = await runtime.records.purge(older_than, cfg.purge_batch)
        return {"olderThanSeconds": older_than.total_seconds(), "records": count}
    max_age = request.max_age or cfg.retry_window
    return await asyncio.to_thread(_retry_failed, runtime, seen, max_age, request)


def _retry_failed(runtime: Runtime, seen: dict[str, Seen], max_age: float, request: JobRequest) -> dict[str, Any]:
    """Provision again now every Failed environment that failed less than `max_age` seconds ago, as a
    person's retry would (the backoff is not waited for, the count starts again); permanent failures
    (a spec that cannot work) are listed, not retried."""
    now = datetime.datetime.now(datetime.UTC)
    retried, permanent = [], []
    for name, item in sorted(seen.items()):
        failed_at = parse_time(item.failed_at)
        if item.phase != Phase.FAILED.value or item.deleting or failed_at is None:
            continue
        if (now - failed_at).total_seconds() > max_age:
            continue
        if item.permanent:
            permanent.append(name)
            continue
        if not request.dry_run:
            body = runtime.kube.get_environment(name)
            if body is None or body["metadata"]["uid"] != item.uid:
                continue  # gone or replaced since the watch saw it
            if (body.get("status") or {}).get("phase") != Phase.FAILED.value:
                continue  # already under way again
            retry(runtime.environments, body, manual=f"job {request.id}", logger=log)
        retried.append(name)
    return {"maxAgeSeconds": max_age, "retried": retried, "permanent": permanent}
