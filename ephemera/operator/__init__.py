"""The kopf operator: `ephemera operator`, or `kopf run -m ephemera.operator`.

Importing this package registers every handler with kopf's default registry.
"""

from ephemera.operator import apps, jobs, lifecycle, policy, shards, startup

__all__ = ["apps", "jobs", "lifecycle", "policy", "shards", "startup"]
