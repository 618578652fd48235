"""Whether a preview's workloads are ready at their new generation, and if they cannot be, why.

Pure functions over the objects as the API server returns them, so that tests and the operator read
them the same way. `assess` takes the workloads a template applied and the pods of the namespace and
answers Ready, still waiting (with what is awaited), or Failed with the object and the cause: a
container's waiting reason, a failed Job, a quota refusal, or a pod no node can take.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ephemera.api.models import parse_time

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# A container waiting for one of these will not start without a change: the rollout has failed.
FATAL_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
UNSCHEDULABLE_GRACE = 60.0  # seconds a pod may wait for a node (an autoscaler may add one)

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Problem:
    """Why a workload cannot become ready: the object, a short reason and the detail."""

    kind: str
    name: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.reason}: {self.message}"


@dataclass
class Assessment:
    ready: bool
    waiting: list[str] = field(default_factory=list)  # what is still awaited, e.g. "Deployment web: 1/2 available"
    problems: list[Problem] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def summary(self, limit: int = 5) -> str:
        items = [str(p) for p in self.problems] or self.waiting
        text = "; ".join(items[:limit])
        return text + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _conditions(obj: Obj) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (obj.get("status") or {}).get("conditions") or []}


def _true(obj: Obj, kind: str) -> bool:
    return _conditions(obj).get(kind, {}).get("status") == "True"


def unobserved(obj: Obj) -> bool:
    """Whether the workload's controller has not yet seen its current generation (its status is older)."""
    observed = int((obj.get("status") or {}).get("observedGeneration") or 0)
    return observed < int((obj.get("metadata") or {}).get("generation") or 1)


def workload_state(obj: Obj) -> tuple[bool, str]:
    """Whether one workload is ready at its current generation; else what it still waits for."""
    kind, meta = obj.get("kind"), obj.get("metadata") or {}
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    label = f"{kind} {meta.get('name')}"
    if kind == "Job":
        return (_true(obj, "Complete"), f"{label}: not complete")
    if unobserved(obj):
        return False, f"{label}: the controller has not seen generation {meta.get('generation')} yet"
    if kind == "Deployment":
        want = int(spec.get("replicas", 1))
        updated, available = int(status.get("updatedReplicas") or 0), int(status.get("availableReplicas") or 0)
        total = int(status.get("replicas") or 0)
        if updated < want or available < want:
            return False, f"{label}: {min(updated, available)}/{want} updated and available"
        if total > updated:  # an older ReplicaSet still has pods: not yet at the new commit only
            return False, f"{label}: {total - updated} old replica(s) still running"
        return True, label
    if kind == "StatefulSet":
        want = int(spec.get("replicas", 1))
        ready, updated = int(status.get("readyReplicas") or 0), int(status.get("updatedReplicas") or 0)
        current = status.get("currentRevision") == status.get("updateRevision")
        if ready < want or updated < want or not current:
            return False, f"{label}: {min(ready, updated)}/{want} updated and ready"
        return True, label
    if kind == "DaemonSet":
        want = int(status.get("desiredNumberScheduled") or 0)
        updated, available = int(status.get("updatedNumberScheduled") or 0), int(status.get("numberAvailable") or 0)
        if updated < want or available < want:
            return False, f"{label}: {min(updated, available)}/{want} updated and available"
        return True, label
    return True, label  # not a workload: applied is all it takes


def _pod_problem(pod: Obj, now: datetime.datetime) -> Problem | None:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    name = str(meta.get("name"))
    statuses = list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])
    for container in statuses:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            last = ((container.get("lastState") or {}).get("terminated") or {}).get("reason")
            detail = waiting.get("message") or ""
            if last:
                detail = f"{detail} (last exit: {last})".strip()
            return Problem("Pod", name, str(waiting["reason"]), f"container {container.get('name')}: {detail}")
    scheduled = _conditions(pod).get("PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        since = parse_time(scheduled.get("lastTransitionTime")) or now
        if (now - since).total_seconds() >= UNSCHEDULABLE_GRACE:
            return Problem("Pod", name, "Unschedulable", str(scheduled.get("message") or "no node can take it"))
    return None


def _workload_problem(obj: Obj) -> Problem | None:
    kind, name = str(obj.get("kind")), str((obj.get("metadata") or {}).get("name"))
    conditions = _conditions(obj)
    if kind == "Job" and conditions.get("Failed", {}).get("status") == "True":
        failed = conditions["Failed"]
        return Problem(kind, name, str(failed.get("reason") or "JobFailed"), str(failed.get("message") or "failed"))
    progressing = conditions.get("Progressing", {})
    if kind == "Deployment" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Problem(kind, name, "ProgressDeadlineExceeded", str(progressing.get("message") or ""))
    failure = conditions.get("ReplicaFailure", {})  # e.g. a quota that refuses the pods
    if kind == "ReplicaSet" and failure.get("status") == "True":  # (its Deployment shows a copy later)
        return Problem(kind, name, str(failure.get("reason") or "ReplicaFailure"), str(failure.get("message") or ""))
    return None


REVISION = "deployment.kubernetes.io/revision"


def current_revisions(replica_sets: Iterable[Obj], workloads: Iterable[Obj] = ()) -> set[str]:
    """The pod-template-hash of each Deployment's newest ReplicaSet, and "" for pods of no ReplicaSet.

    No hash for a Deployment (among `workloads`) whose controller has not yet seen its generation: its
    newest ReplicaSet may not exist yet, and the one before (a template just fixed, its pods still
    failing) would be judged in its place."""
    unsettled = {
        (w.get("metadata") or {}).get("uid") for w in workloads if w.get("kind") == "Deployment" and unobserved(w)
    }
    newest: dict[str, tuple[int, str]] = {}
    for replica_set in replica_sets:
        meta = replica_set.get("metadata") or {}
        owners = [
            ref.get("uid")
            for ref in meta.get("ownerReferences") or []
            if ref.get("kind") == "Deployment" and ref.get("uid") not in unsettled
        ]
        revision = int((meta.get("annotations") or {}).get(REVISION) or 0)
        template_hash = (meta.get("labels") or {}).get("pod-template-hash", "")
        for owner in owners:
            if owner not in newest or revision > newest[owner][0]:
                newest[str(owner)] = (revision, template_hash)
    return {""} | {template_hash for _, template_hash in newest.values()}


def assess(
    workloads: Iterable[Obj],
    pods: Iterable[Obj],
    replica_sets: Iterable[Obj] = (),
    now: datetime.datetime | None = None,
) -> Assessment:
    """Ready when every workload is; Failed as soon as one cannot become ready without a change."""
    now = now or datetime.datetime.now(datetime.UTC)
    result = Assessment(ready=True)
    workloads = list(workloads)
    for obj in workloads:
        ready, waiting = workload_state(obj)
        if not ready:
            result.ready = False
            result.waiting.append(waiting)
        problem = _workload_problem(obj)
        if problem is not None:
            result.problems.append(problem)
    for replica_set in replica_sets:  # a quota refusal shows on the ReplicaSet, not on its Deployment
        problem = _workload_problem(replica_set)
        if problem is not None and int((replica_set.get("spec") or {}).get("replicas") or 0) > 0:
            result.problems.append(problem)
    current = current_revisions(replica_sets, workloads)
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if meta.get("deletionTimestamp") or labels.get("pod-template-hash", "") not in current:
            continue  # on its way out, or an older ReplicaSet's: the new revision is what is judged
        problem = _pod_problem(pod, now)
        if problem is not None:
            result.problems.append(problem)
    if result.problems:
        result.ready = False
    return result
