"""The kopf operator: `ephemera operator`, or `kopf run -m ephemera.operator`.

Importing this package registers every handler with kopf's default registry.
"""

from ephemera.operator import apps, lifecycle, shards, startup, timers

__all__ = ["apps", "lifecycle", "shards", "startup", "timers"]
