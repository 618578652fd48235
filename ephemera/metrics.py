"""The operator process's Prometheus registry, shared by its parts (lifecycle, records, GitHub)."""

from prometheus_client import CollectorRegistry

REGISTRY = CollectorRegistry(auto_describe=True)
