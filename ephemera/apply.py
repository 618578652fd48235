"""Apply a rendered template into a preview namespace, prune what it no longer renders, and judge readiness.

One path for inline resources and Helm charts alike: every object is checked first (namespaced, in the
preview namespace, not denied), then applied with server-side apply under the field manager
`ephemera`. What was applied is the inventory, kept in the environment's status, so that the next
apply deletes exactly what the template stopped rendering and nothing it never made.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ephemera.kube import Kube, KubeError, Obj
from ephemera.readiness import WORKLOAD_KINDS, Assessment, assess
from ephemera.templates import DEFAULT_DENY, TemplateError, check_objects

FIELD_MANAGER = "ephemera"
# Applied first, so that what workloads mount or run as exists when their pods start.
FIRST = ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret", "PersistentVolumeClaim", "Service")
TYPED_PATCH = "failed to create typed patch object"
WORKLOAD_API = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1", "Job": "batch/v1"}


@dataclass(frozen=True, order=True)
class Ref:
    """One inventory entry: an object a template applied."""

    api_version: str
    kind: str
    name: str

    @classmethod
    def of(cls, obj: Obj) -> Ref:
        return cls(str(obj["apiVersion"]), str(obj["kind"]), str(obj["metadata"]["name"]))

    @classmethod
    def from_status(cls, entry: Obj) -> Ref:
        return cls(str(entry["apiVersion"]), str(entry["kind"]), str(entry["name"]))

    def to_status(self) -> dict[str, str]:
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name}


def _order(obj: Obj) -> int:
    kind = obj.get("kind")
    return FIRST.index(kind) if kind in FIRST else len(FIRST)


def _pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    """A workload's pod template, where its pods' labels are set."""
    if obj.get("kind") not in WORKLOAD_KINDS:
        return None
    template = (obj.get("spec") or {}).get("template")
    return template if isinstance(template, dict) else None


class Applier:
    """Server-side apply into one namespace at a time, with the operator's own rights only."""

    def __init__(self, kube: Kube, *, deny: Iterable[str] = DEFAULT_DENY, reserved: Iterable[tuple[str, str]] = ()):
        self.kube = kube
        self.deny = tuple(deny)
        self.reserved = tuple(reserved)
        self._kinds: dict[str, dict[str, tuple[str, bool]] | None] = {}

    def _kind(self, api_version: str, kind: str) -> tuple[str, bool] | None:
        """(plural, namespaced) of a kind, from discovery (cached: a kind's scope never changes)."""
        if api_version not in self._kinds:
            self._kinds[api_version] = self.kube.served_kinds(api_version)
        served = self._kinds[api_version]
        if served is None or kind not in served:
            self._kinds.pop(api_version, None)  # a CRD may be installed later: ask again next time
            return None
        return served[kind]

    def namespaced(self, api_version: str, kind: str) -> bool | None:
        found = self._kind(api_version, kind)
        return None if found is None else found[1]

    def plan(self, objects: Sequence[Any], namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        """The objects as they will be applied, or TemplateError before anything is applied."""
        checked = check_objects(objects, namespace, self.namespaced, deny=self.deny, reserved=self.reserved)
        for obj in checked:
            meta = obj["metadata"]
            meta["labels"] = {**(meta.get("labels") or {}), **labels}
            template = _pod_template(obj)
            if template is not None:  # its pods carry them too: the operator watches them by these labels
                pod_meta = template.setdefault("metadata", {})
                pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels}
        return sorted(checked, key=_order)

    def apply(
        self, objects: Sequence[Any], namespace: str, labels: dict[str, str], previous: Iterable[Ref] = ()
    ) -> list[Ref]:
        """Apply every object, then prune what `previous` held and the template no longer renders.

        A refusal by the API server (an invalid field, a quota) is a TemplateError naming the object;
        an unreachable API server is a temporary KubeError."""
        planned = self.plan(objects, namespace, labels)
        for obj in planned:
            found = self._kind(obj["apiVersion"], obj["kind"])
            assert found is not None  # plan() checked it
            try:
                self.kube.apply_object(obj, found[0], FIELD_MANAGER)
            except KubeError as err:
                # Server-side apply answers a value of the wrong type with a 500 (the typed patch cannot
                # be built): no retry mends that either.
                if err.temporary and TYPED_PATCH not in str(err):
                    raise
                raise TemplateError("ApplyRefused", f"{err}") from err
        inventory = sorted({Ref.of(obj) for obj in planned})
        for ref in sorted(set(previous) - set(inventory)):
            found = self._kind(ref.api_version, ref.kind)
            if found is not None:
                self.kube.delete_object(ref.api_version, found[0], namespace, ref.name)
        return inventory

    def observe(self, namespace: str, inventory: Iterable[Ref], only: Iterable[tuple[str, str]] = ()) -> Assessment:
        """Judge the readiness of the inventory's workloads (or just `only`, as (kind, name) pairs)."""
        wanted = set(only) or {(ref.kind, ref.name) for ref in inventory if ref.kind in WORKLOAD_KINDS}
        workloads: list[Obj] = []
        for kind in sorted({kind for kind, _ in wanted}):
            plural = f"{kind.lower()}s"
            listed = self.kube.list_objects(WORKLOAD_API[kind], plural, namespace)
            names = {name for k, name in wanted if k == kind}
            workloads += [{**o, "kind": kind} for o in listed if o["metadata"]["name"] in names]
            missing = names - {o["metadata"]["name"] for o in listed}
            if missing:  # not applied (yet), or deleted by someone: not ready
                return Assessment(ready=False, waiting=[f"{kind} {name}: not found" for name in sorted(missing)])
        pods = self.kube.list_objects("v1", "pods", namespace)
        listed_sets = self.kube.list_objects("apps/v1", "replicasets", namespace) if wanted else []
        replica_sets = [{**o, "kind": "ReplicaSet"} for o in listed_sets]  # items of a list carry no kind
        return assess(workloads, pods, replica_sets)
