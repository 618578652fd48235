"""What GitHub tells Ephemera, applied to the cluster: pull request events, closes and installations.

A service, below its two callers: the webhook (`ephemera.webhook`) hands it each verified event,
and the operator's backstop (`ephemera.backstop`) the PRs it finds missed.
"""
