"""Ephemera: a preview environment on Kubernetes for every GitHub pull request."""

__version__ = "0.1.0"
