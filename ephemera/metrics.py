"""The operator process's Prometheus registry, shared by its parts (lifecycle, records, GitHub), and
what every Ephemera process exports beside its own metrics."""

from prometheus_client import CollectorRegistry, GCCollector, Info, PlatformCollector, ProcessCollector

from ephemera import __version__


def process_registry() -> CollectorRegistry:
    """A registry holding what prometheus_client's default one has (process_*, python_info,
    python_gc_*), which a registry of one's own otherwise drops, and `ephemera_build_info{version}`."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Info("ephemera_build", "The running Ephemera's version (always 1).", registry=registry).info(
        {"version": __version__}
    )
    return registry


REGISTRY = process_registry()
