"""Render a template's Helm chart with the helm binary (`helm template`), into objects the Applier applies.

Helm only renders here: nothing is installed, no release is kept, and no hook runs on its own. The
objects go through the same checks, apply, inventory and prune as inline resources. Helm runs with a
home of its own (no user repositories, plugins or registry logins), and a time limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ephemera.templates import HelmSource, TemplateError

RELEASE = "preview"  # the release name charts see: objects are named as `helm install preview ...` would name them


def chart_args(source: HelmSource) -> list[str]:
    """The chart reference and where it comes from: an OCI reference, or a chart in an HTTP(S) repository."""
    if source.repository.startswith("oci://"):
        return [f"{source.repository.rstrip('/')}/{source.chart}", "--version", source.version]
    return [source.chart, "--repo", source.repository, "--version", source.version]


def render_chart(
    helm: Path,
    source: HelmSource,
    namespace: str,
    *,
    home: Path,
    timeout: float = 120.0,
    kube_version: str | None = None,
) -> list[Any]:
    """The chart's objects for `namespace`, its values already rendered; TemplateError if helm fails."""
    dirs = {name: home / name for name in ("cache", "config", "data", "plugins")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(dirs["cache"]),
        "HELM_CONFIG_HOME": str(dirs["config"]),
        "HELM_DATA_HOME": str(dirs["data"]),
        "HELM_PLUGINS": str(dirs["plugins"]),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=home, delete=False) as values:
        json.dump(source.values, values)
    args = [str(helm), "template", RELEASE, *chart_args(source), "--namespace", namespace, "--values", values.name]
    args += ["--skip-tests"] + (["--kube-version", kube_version] if kube_version else [])
    where = f"chart {source.chart} {source.version} from {source.repository}"
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise TemplateError("ChartRenderError", f"{where}: helm template took more than {timeout:.0f} s") from err
    finally:
        Path(values.name).unlink(missing_ok=True)
    if done.returncode != 0:
        detail = " ".join(done.stderr.strip().splitlines()[-3:]) or f"exit {done.returncode}"
        raise TemplateError("ChartRenderError", f"{where}: {detail}")
    try:
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]
    except yaml.YAMLError as err:
        raise TemplateError("ChartRenderError", f"{where}: helm's output does not parse: {err}") from err
