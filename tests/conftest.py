"""Session fixtures: one real control plane (etcd, kube-apiserver, kube-controller-manager) per run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ephemera.devtools.controlplane import REPO_ROOT, ControlPlane, running
from tests.support import Kubectl, wait_for

CRD = REPO_ROOT / "crds" / "previewenvironments.yaml"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with running(tmp_path_factory.mktemp("control-plane")) as plane:
        os.environ["KUBECONFIG"] = str(plane.kubeconfig)
        yield plane


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    return Kubectl(control_plane.bin_dir / "kubectl", control_plane.kubeconfig)


@pytest.fixture(scope="session")
def crd(kubectl: Kubectl) -> Path:
    """The PreviewEnvironment CRD, installed and Established."""
    kubectl.run("apply", "-f", str(CRD))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/previewenvironments.ephemera.dev")
    # Discovery can lag the Established condition by a moment; kubectl needs it to map `pe`.
    wait_for(lambda: kubectl.run("get", "pe", check=False).returncode == 0, timeout=30, what="pe discovery")
    return CRD
