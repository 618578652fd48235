"""What the operator keeps in memory per object: only what its handlers need, and nothing for the
objects that are not Ephemera's (issue 19, part 3)."""

from __future__ import annotations

import concurrent.futures
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest
from kopf._cogs.structs.references import Resource

from devtools.support import Process, wait_for
from ephemera.api.models import GROUP, KIND, VERSION
from ephemera.api.naming import ENVIRONMENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, SHARD_LABEL, environment_name
from ephemera.config import Settings
from ephemera.kube import PAGE_SIZE, Kube
from ephemera.ledger import Ledger
from ephemera.operator import apps, policy, startup
from ephemera.operator.runtime import Runtime
from ephemera.watchcache import Seen
from tests.conftest import operator_with
from tests.test_metrics import scrape


def _resource(group: str, version: str, plural: str, kind: str, namespaced: bool = True) -> Resource:
    singular = kind.lower()
    return Resource(group=group, version=version, plural=plural, kind=kind, singular=singular, namespaced=namespaced)


def _selectors(settings: kopf.OperatorSettings, resource: Resource) -> list[str]:
    return sorted(set(settings.watching.label_selectors.collect(resource)))


def test_the_watches_ask_the_api_server_only_for_ephemeras_namespaces_and_workloads() -> None:
    """kopf filters a handler's labels on its own side: unless the watch itself carries the selector,
    every namespace and pod of the cluster is sent to the operator, which keeps a record of each."""
    settings = kopf.OperatorSettings()
    startup._tune(settings, Settings())
    namespaces = _resource("", "v1", "namespaces", "Namespace", namespaced=False)
    assert _selectors(settings, namespaces) == [f"{MANAGED_BY_LABEL}={MANAGED_BY}"]
    workloads = [
        _resource("apps", "v1", "deployments", "Deployment"),
        _resource("apps", "v1", "statefulsets", "StatefulSet"),
        _resource("apps", "v1", "daemonsets", "DaemonSet"),
        _resource("apps", "v1", "replicasets", "ReplicaSet"),
        _resource("batch", "v1", "jobs", "Job"),
        _resource("", "v1", "pods", "Pod"),
    ]
    for workload in workloads:
        assert _selectors(settings, workload) == [f"{MANAGED_BY_LABEL}={MANAGED_BY},{ENVIRONMENT_LABEL}"], workload
    # The PreviewEnvironments and templates are all Ephemera's: no selector narrows them here.
    environments = _resource("ephemera.dev", "v1alpha1", "previewenvironments", "PreviewEnvironment", False)
    assert _selectors(settings, environments) == []
    assert len(apps.WORKLOADS) == len(workloads)


def test_a_restarts_first_listing_is_read_in_pages() -> None:
    settings = kopf.OperatorSettings()
    startup._tune(settings, Settings())
    assert settings.watching.chunk_size == PAGE_SIZE


def test_a_listing_of_environments_keeps_everything_but_the_managed_fields(crd: Path, kube: Kube) -> None:
    """The resyncs hold a whole listing at once: managed fields (which nothing reads) would be more than
    half of it."""
    name = environment_name("footprint/listing", 1)
    kube.create_environment(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name, "labels": {"footprint": "yes"}, "annotations": {"note": "kept"}},
            "spec": {"repository": "footprint/listing", "pullRequest": 1, "commitSha": "b" * 40, "branch": "f"},
        }
    )
    try:
        kube.patch_environment_status(name, {"phase": "Ready", "message": "listed"})

        def same_version() -> tuple[dict[str, Any], dict[str, Any]] | None:
            # The session's operator may be writing the object (its finalizer, its status) between the
            # read and the listing: compare the two only when they saw the same version of it.
            stored = kube.get_environment(name)
            listed = next(obj for obj in kube.list_environments() if obj["metadata"]["name"] == name)
            assert stored is not None
            same = stored["metadata"]["resourceVersion"] == listed["metadata"]["resourceVersion"]
            return (stored, listed) if same else None

        stored, listed = wait_for(same_version, timeout=60, what="a read and a listing of the same version")
        assert stored["metadata"].get("managedFields")  # the API server has them
        assert "managedFields" not in listed["metadata"]
        stored["metadata"].pop("managedFields")
        assert listed == stored
    finally:
        kube.delete_environment(name)


def test_what_the_watch_keeps_of_each_object_shares_the_values_many_objects_hold() -> None:
    def body(number: int) -> dict[str, object]:
        # Parsed from JSON as a watch event is: every string is a copy of its own.
        text = json.dumps(
            {
                "metadata": {"name": f"pr-{number}", "uid": f"uid-{number}"},
                "spec": {"repository": "octo-org/shop"},
                "status": {"phase": "Ready", "reason": "Ready", "template": {"name": "web", "generation": 2}},
            }
        )
        parsed: dict[str, object] = json.loads(text)
        return parsed

    first, second = Seen.from_body(body(1)), Seen.from_body(body(2))
    assert (first.phase, first.reason, first.repository, first.template) == ("Ready", "Ready", "octo-org/shop", "web")
    assert first.template_generation == 2
    assert first.uid == "uid-1"
    assert first.phase is second.phase
    assert first.reason is second.reason
    assert first.repository is second.repository
    assert first.template is second.template


async def test_the_ledgers_resync_brings_it_to_the_listing_read_page_by_page(crd: Path, kube: Kube) -> None:
    """The periodic resync of the policy's ledger (read into entries page by page, off the event loop)
    takes what the cluster lists and drops what it no longer has."""
    name = environment_name("footprint/ledger", 1)
    kube.create_environment(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name},
            "spec": {"repository": "footprint/ledger", "pullRequest": 1, "commitSha": "c" * 40, "branch": "f"},
        }
    )
    try:
        ledger = Ledger()
        gone = {"metadata": {"name": "gone", "uid": "gone", "creationTimestamp": "2026-01-01T00:00:00Z"}}
        ledger.prime([gone])
        runtime = SimpleNamespace(admission=None, expiry=None, ledger=ledger, settings=Settings(), kube=kube)
        resync = next(job for _, job, label in policy.jobs(cast(Runtime, runtime)) if label == "policy-ledger-resync")
        await resync()
        names = {entry.name for entry in ledger.entries()}
        assert name in names
        assert "gone" not in names
        entry = ledger.get(name)
        assert entry is not None
        assert entry.repository == "footprint/ledger"
    finally:
        kube.delete_environment(name)


def test_the_worker_limit_reaches_kopf() -> None:
    settings = kopf.OperatorSettings()
    startup._tune(settings, Settings(worker_limit=7))
    assert settings.queueing.worker_limit == 7
    # A worker's slot is free soon after its object's last event (kopf keeps it 5 s by default).
    assert settings.queueing.idle_timeout == startup.WORKER_IDLE_TIMEOUT < 1
    startup._tune(settings, Settings(worker_limit=0))  # 0: no limit, as kopf spells it
    assert settings.queueing.worker_limit is None


# The limited operator is a shard of its own (its label selector): it sees the test's twelve objects
# only, not every object earlier modules left (~250 in a full run, resumed two at a time: a minute
# quiet, and growing with the suite).
LIMITED_SHARDS, LIMITED_SHARD = 8, 7


@pytest.fixture
def limited_operator(operator: Process) -> Iterator[Process]:
    yield from operator_with(
        operator,
        {"EPHEMERA_WORKER_LIMIT": "2", "EPHEMERA_SHARDS": str(LIMITED_SHARDS), "EPHEMERA_SHARD": str(LIMITED_SHARD)},
    )


def _peak(port: int) -> float:
    found = re.search(r"^ephemera_handlers_in_flight_peak (\S+)$", scrape(port), re.MULTILINE)
    assert found, "the operator exports ephemera_handlers_in_flight_peak"
    return float(found.group(1))


def test_the_operator_works_on_at_most_worker_limit_environments_at_once(limited_operator: Process, kube: Kube) -> None:
    """Every object in flight keeps memory the process never gives back: with EPHEMERA_WORKER_LIMIT=2 a
    burst of 12 created at once is provisioned two at a time (each object's handlers run in its own kopf
    worker), and all become Ready."""
    repo = "footprint/limit"
    names = [environment_name(repo, number) for number in range(1, 13)]

    def create(number: int) -> None:
        kube.create_environment(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "metadata": {"name": environment_name(repo, number), "labels": {SHARD_LABEL: str(LIMITED_SHARD)}},
                "spec": {"repository": repo, "pullRequest": number, "commitSha": "d" * 40, "branch": "f"},
            }
        )

    def phases() -> list[str | None]:
        return [((kube.get_environment(name) or {}).get("status") or {}).get("phase") for name in names]

    try:
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(create, range(1, len(names) + 1)))
        wait_for(lambda: phases() == ["Ready"] * len(names), timeout=180, what="all 12 Ready")
        peak = _peak(limited_operator.port)
        assert 1 <= peak <= 2, f"{peak:.0f} handler runs at once with EPHEMERA_WORKER_LIMIT=2"
    finally:
        for name in names:
            kube.delete_environment(name)
