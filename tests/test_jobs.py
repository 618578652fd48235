"""`ephemera jobs run` (and `kubectl ephemera jobs run`): the running operator runs the job on request,
under the same lock as its periodic run, and the command prints the report."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.postgres import Postgres
from devtools.support import Kubectl, Process
from ephemera.api.models import parse_phase, parse_time
from ephemera.kube import Kube
from ephemera.ondemand import JobRequest, submit, wait_report
from ephemera.store.engine import make_engine
from ephemera.store.queries import history
from ephemera.store.records import Records
from ephemera.transitions import Transition
from tests.test_operator import SHA_A, make_env, wait_phase
from tests.test_plugin import plugin

LONG_AGO = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


def jobs(control_plane: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    """`ephemera jobs run ARGS` as a person runs it, against the test cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPHEMERA_")}
    env["EPHEMERA_KUBECONFIG"] = str(control_plane.kubeconfig)
    return subprocess.run(
        [sys.executable, "-m", "ephemera.cli", "jobs", "run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
    )


def report_of(answer: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert answer.returncode == 0, (answer.stdout, answer.stderr)
    data: dict[str, Any] = json.loads(answer.stdout)
    assert data["ok"], data
    return data


def seed_destroyed(url: str) -> tuple[str, str]:
    """A record of an environment destroyed long ago, straight into the records database."""
    name, uid = f"jobs-old-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    spec = {"repository": "octo-org/jobs", "pullRequest": 1, "commitSha": SHA_A}

    def at(days: int, old: str | None, phase: str) -> Transition:
        when = LONG_AGO + datetime.timedelta(days=days)
        iso = when.isoformat().replace("+00:00", "Z")
        before = parse_phase(old) if old else None
        return Transition(
            name, uid, 1, spec, before, parse_phase(phase), phase, phase, iso, {}, created=iso, occurred=when
        )

    async def write() -> None:
        records = Records(make_engine(url))
        await records.write(at(0, None, "Provisioning"))
        await records.write(at(1, "Provisioning", "Destroyed"))
        await records.engine.dispose()

    asyncio.run(write())
    return name, uid


def recorded(url: str, name: str) -> bool:
    async def read() -> bool:
        engine = make_engine(url)
        try:
            return bool(await history(engine, name))
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_purge_on_request_and_its_dry_run(operator: Process, control_plane: ControlPlane, postgres: Postgres) -> None:
    name, _ = seed_destroyed(postgres.url)
    # Destroyed in 2000: older than 9,000 days, unlike anything the other tests recorded.
    dry = report_of(jobs(control_plane, "purge", "--older-than", "9000d", "--dry-run", "-o", "json"))
    assert dry["job"] == "purge"
    assert dry["dryRun"] is True
    assert dry["result"]["records"] >= 1
    assert dry["result"]["olderThanSeconds"] == 9000 * 86400
    assert recorded(postgres.url, name), "a dry run purged the record"

    done = report_of(jobs(control_plane, "purge", "--older-than", "9000d", "-o", "json"))
    assert done["result"]["records"] == dry["result"]["records"]
    assert not recorded(postgres.url, name)

    text = jobs(control_plane, "purge", "--older-than", "9000d")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].startswith("purge ")
    assert "records: 0" in text.stdout


def failed_long_retried(kubectl: Kubectl, name: str) -> None:
    """Make the Ready environment `name` Failed as a temporary failure makes it, with its automatic
    retries spent (so that only a requested retry brings it back)."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    status: dict[str, Any] = {"phase": "Failed", "reason": "Test", "message": "failed for the test", "failedAt": now}
    status |= {"permanent": False, "retries": 3}
    kubectl.run("patch", "pe", name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))


def test_retry_failed_on_request_and_its_dry_run(
    operator: Process, control_plane: ControlPlane, kubectl: Kubectl
) -> None:
    name = f"jobs-retry-{uuid.uuid4().hex[:6]}"
    kubectl.apply(make_env(name, 31, repo="octo-org/jobs"))
    wait_phase(kubectl, name, "Ready")
    failed_long_retried(kubectl, name)

    dry = report_of(jobs(control_plane, "retry-failed", "--max-age", "1h", "--dry-run", "-o", "json"))
    assert name in dry["result"]["retried"]
    assert kubectl.json("get", "pe", name)["status"]["phase"] == "Failed"

    done = report_of(jobs(control_plane, "retry-failed", "--max-age", "1h", "-o", "json"))
    assert name in done["result"]["retried"]
    assert done["result"]["maxAgeSeconds"] == 3600
    wait_phase(kubectl, name, "Ready")

    # Arguments that belong to another job, or are not durations, are refused before anything is asked.
    for bad in (["purge", "--max-age", "2h"], ["retry-failed", "--max-age", "soon"]):
        refused = jobs(control_plane, *bad)
        assert refused.returncode == 2, (bad, refused.stderr)


def test_sweep_on_request_from_kubectl_and_two_at_once_run_one_after_the_other(
    operator: Process, control_plane: ControlPlane, crd: Path, kube: Kube
) -> None:
    answer = plugin(control_plane, "jobs", "run", "sweep", "--dry-run", "-o", "json")
    dry = report_of(answer)
    assert dry["job"] == "sweep"
    assert dry["dryRun"] is True
    assert set(dry["result"]) == {"stale", "stuckDeletions", "recreated", "orphans", "actions"}
    text = plugin(control_plane, "jobs", "run", "sweep", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert "(dry run: nothing changed)" in text.stdout

    # Two requests in one write: the operator sees both in the same event, and runs them one after the other.
    requests = [JobRequest.new("sweep", dry_run=False) for _ in range(2)]
    submit(kube, "default", *requests)
    reports = [wait_report(kube, "default", r, timeout=120) for r in requests]
    assert None not in reports, reports
    spans = sorted((parse_time(r["startedAt"]), parse_time(r["finishedAt"])) for r in reports if r)
    (first_start, first_end), (second_start, _) = spans
    assert first_start is not None
    assert first_end is not None
    assert second_start is not None
    assert first_end <= second_start, f"the two sweeps overlapped: {spans}"


@pytest.mark.parametrize("args", [["sweep", "--older-than", "2d"], ["vacuum"]])
def test_wrong_jobs_and_arguments_are_refused(control_plane: ControlPlane, args: list[str]) -> None:
    refused = jobs(control_plane, *args)
    assert refused.returncode == 2
    assert "error" in refused.stderr
