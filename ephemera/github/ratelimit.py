"""GitHub's rate limit as the last answer's X-RateLimit-* headers told it, for alerts and dashboards.

Both gauges come from the same answer, so `remaining / limit` is the share left of the window that
the alert on "below 10%" divides by (installation tokens have limits of their own: 5,000 an hour
and more on large organisations)."""

from __future__ import annotations

from prometheus_client import Gauge

from ephemera.metrics import REGISTRY

REMAINING = Gauge(
    "ephemera_github_rate_limit_remaining", "GitHub API requests left in the current window.", registry=REGISTRY
)
LIMIT = Gauge(
    "ephemera_github_rate_limit_limit",
    "GitHub API requests allowed in the current window (X-RateLimit-Limit); 0 before the first answer.",
    registry=REGISTRY,
)


def observe(rate_limiting: tuple[int, int]) -> None:
    """Record PyGithub's `requester.rate_limiting` (remaining, limit); (-1, -1) before any answer."""
    remaining, limit = rate_limiting
    if remaining >= 0 and limit > 0:
        REMAINING.set(remaining)
        LIMIT.set(limit)
