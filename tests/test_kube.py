"""The Kubernetes adapter's single choke point: every call that cannot reach the API server says so
as a temporary KubeError, whatever the method."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from ephemera.kube import Kube, KubeError


def _unreachable() -> Kube:
    """A client of an API server that is not there: a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = False
    return Kube(client.ApiClient(configuration), request_timeout=5.0)


CALLS: dict[str, Callable[[Kube], Any]] = {
    "get_namespace": lambda kube: kube.get_namespace("ns"),
    "list_namespaces": lambda kube: kube.list_namespaces("a=b"),
    "list_environments": lambda kube: list(kube.list_environments()),
    "patch_environment_status": lambda kube: kube.patch_environment_status("pe", {"phase": "Ready"}),
    "delete_namespace": lambda kube: kube.delete_namespace("ns", "uid"),
    "served_kinds": lambda kube: kube.served_kinds("apps/v1"),
    "namespace_blockers": lambda kube: kube.namespace_blockers("ns"),
    "create_event": lambda kube: kube.create_event(
        {"apiVersion": "ephemera.dev/v1alpha1", "kind": "PreviewEnvironment", "metadata": {"name": "pe", "uid": "u"}},
        "Normal",
        "Test",
        "message",
        component="test",
    ),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_an_unreachable_api_server_is_a_temporary_kube_error(call: str) -> None:
    kube = _unreachable()
    try:
        with pytest.raises(KubeError, match="Kubernetes API unreachable") as raised:
            CALLS[call](kube)
    finally:
        kube.close()
    assert raised.value.temporary
    assert raised.value.status == 0
