"""Pure builders of the objects an environment owns: its Namespace and what isolates it.

They take plain values and return plain dicts, so tests can call them without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ephemera.api.models import API_VERSION, KIND, PreviewEnvironmentSpec
from ephemera.api.naming import OWNER_UID_ANNOTATION, REPOSITORY_ANNOTATION, environment_labels
from ephemera.api.quantity import parse_quantity
from ephemera.config import Settings

QUOTA_NAME = "ephemera-quota"
LIMIT_RANGE_NAME = "ephemera-limits"
NETWORK_POLICY_NAME = "ephemera-isolation"
EGRESS_POLICY_NAME = "ephemera-egress"
# Where cluster DNS answers (the kube-dns Service's pods, as kubeadm and most distributions label them).
DNS_NAMESPACE = "kube-system"
DNS_POD_LABELS = {"k8s-app": "kube-dns"}


class QuotaError(ValueError):
    """A requested quota that the operator's ceiling does not allow."""


@dataclass(frozen=True)
class Quota:
    cpu: str
    memory: str
    pods: int
    # The same for every environment (settings): what would otherwise be unlimited.
    load_balancers: int = 0
    node_ports: int = 0
    persistent_volume_claims: int = 5
    storage: str = "20Gi"
    ephemeral_storage: str = "10Gi"
    config_maps: int = 50
    secrets: int = 50
    services: int = 20


def resolve_quota(spec: PreviewEnvironmentSpec, settings: Settings) -> Quota:
    """The quota from the spec, defaults from settings; a request above the ceiling is refused."""
    cpu = spec.resources.cpu or settings.default_cpu
    memory = spec.resources.memory or settings.default_memory
    pods = spec.resources.pods or settings.default_pods
    checks: list[tuple[str, Decimal, Decimal, str, str]] = [
        ("cpu", parse_quantity(cpu), parse_quantity(settings.max_cpu), cpu, settings.max_cpu),
        ("memory", parse_quantity(memory), parse_quantity(settings.max_memory), memory, settings.max_memory),
        ("pods", Decimal(pods), Decimal(settings.max_pods), str(pods), str(settings.max_pods)),
    ]
    for field, value, ceiling, text, ceiling_text in checks:
        if value > ceiling:
            raise QuotaError(
                f"spec.resources.{field} is {text}, above the ceiling {ceiling_text} "
                f"(EPHEMERA_MAX_{field.upper()}); lower it or ask an operator to raise the ceiling"
            )
    return Quota(
        cpu=str(cpu),
        memory=str(memory),
        pods=int(pods),
        load_balancers=settings.quota_load_balancers,
        node_ports=settings.quota_node_ports,
        persistent_volume_claims=settings.quota_persistent_volume_claims,
        storage=settings.quota_storage,
        ephemeral_storage=settings.quota_ephemeral_storage,
        config_maps=settings.quota_config_maps,
        secrets=settings.quota_secrets,
        services=settings.quota_services,
    )


def _min(a: str, b: str) -> str:
    return a if parse_quantity(a) <= parse_quantity(b) else b


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid, "controller": True}


def build_namespace(namespace: str, env_name: str, env_uid: str, spec: PreviewEnvironmentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": namespace,
            "labels": environment_labels(env_name, spec.repository, spec.pull_request),
            "annotations": {OWNER_UID_ANNOTATION: env_uid, REPOSITORY_ANNOTATION: spec.repository},
            "ownerReferences": [owner_reference(env_name, env_uid)],
        },
    }


def _child_metadata(name: str, namespace: str, env_name: str, spec: PreviewEnvironmentSpec) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": environment_labels(env_name, spec.repository, spec.pull_request),
    }


def build_resource_quota(namespace: str, env_name: str, spec: PreviewEnvironmentSpec, quota: Quota) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _child_metadata(QUOTA_NAME, namespace, env_name, spec),
        "spec": {
            "hard": {
                "requests.cpu": quota.cpu,
                "limits.cpu": quota.cpu,
                "requests.memory": quota.memory,
                "limits.memory": quota.memory,
                "pods": str(quota.pods),
                # A preview gets no cloud load balancer and no port on every node unless allowed.
                "services.loadbalancers": str(quota.load_balancers),
                "services.nodeports": str(quota.node_ports),
                "persistentvolumeclaims": str(quota.persistent_volume_claims),
                "requests.storage": quota.storage,
                # Node disk: the LimitRange gives containers that ask for none a share of it.
                "requests.ephemeral-storage": quota.ephemeral_storage,
                "limits.ephemeral-storage": quota.ephemeral_storage,
                "configmaps": str(quota.config_maps),
                "secrets": str(quota.secrets),
                "services": str(quota.services),
            }
        },
    }


def build_limit_range(namespace: str, env_name: str, spec: PreviewEnvironmentSpec, quota: Quota) -> dict[str, Any]:
    """Defaults for containers that set no requests or limits, so that they fit in the quota."""
    cpu_limit = _min("500m", quota.cpu)
    memory_limit = _min("512Mi", quota.memory)
    disk_limit = _min("1Gi", quota.ephemeral_storage)
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": _child_metadata(LIMIT_RANGE_NAME, namespace, env_name, spec),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "default": {"cpu": cpu_limit, "memory": memory_limit, "ephemeral-storage": disk_limit},
                    "defaultRequest": {
                        "cpu": _min("100m", cpu_limit),
                        "memory": _min("128Mi", memory_limit),
                        "ephemeral-storage": _min("128Mi", disk_limit),
                    },
                    "max": {"cpu": quota.cpu, "memory": quota.memory, "ephemeral-storage": quota.ephemeral_storage},
                }
            ]
        },
    }


def build_network_policy(namespace: str, env_name: str, spec: PreviewEnvironmentSpec) -> dict[str, Any]:
    """Deny ingress from other namespaces; allow it between the environment's own pods."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _child_metadata(NETWORK_POLICY_NAME, namespace, env_name, spec),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
        },
    }


def build_egress_policy(
    namespace: str, env_name: str, spec: PreviewEnvironmentSpec, settings: Settings
) -> dict[str, Any]:
    """Deny egress but to the environment's own pods and cluster DNS, plus what the settings allow.

    Without it a preview reaches the API server, the cloud's metadata service and every other
    namespace. (Enforced by the cluster's network plugin; one without NetworkPolicy ignores it.)
    """
    dns_port = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    rules: list[dict[str, Any]] = [
        {"to": [{"podSelector": {}}]},
        {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": DNS_NAMESPACE}},
                    "podSelector": {"matchLabels": dict(DNS_POD_LABELS)},
                }
            ],
            "ports": dns_port,
        },
    ]
    if settings.egress_allow_cidrs:
        rules.append({"to": [{"ipBlock": {"cidr": cidr}} for cidr in settings.egress_allow_cidrs]})
    rules += [dict(rule) for rule in settings.egress_extra_rules]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _child_metadata(EGRESS_POLICY_NAME, namespace, env_name, spec),
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": rules},
    }
