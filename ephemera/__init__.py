"""Ephemera: a preview environment on Kubernetes for every GitHub pull request."""

from importlib import metadata

try:
    # One source of the version: pyproject.toml, as installed (`ephemera --version`, `kubectl ephemera version`).
    __version__ = metadata.version("ephemera")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
