"""Records in PostgreSQL (and SQLite): every environment and every transition, never blocking reconciliation."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.postgres import Postgres
from devtools.support import Kubectl, Process, process_env, wait_for
from ephemera.api.models import parse_phase
from ephemera.store.engine import check_schema, current_revision, head_revision, make_engine, upgrade
from ephemera.store.records import Records
from ephemera.transitions import Transition
from tests.test_operator import SHA_B, make_env, wait_phase

LIFECYCLE = ["Provisioning", "Ready", "Updating", "Ready", "Destroying", "Destroyed"]


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EPHEMERA_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "ephemera.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def history(url: str, name: str) -> list[dict[str, Any]]:
    result = cli(url, "environments", "history", name, "-o", "json")
    if result.returncode != 0:
        return []
    data: list[dict[str, Any]] = json.loads(result.stdout)
    return data


def phases(url: str, name: str) -> list[str]:
    found = history(url, name)
    return [e["to_phase"] for e in found[0]["events"]] if found else []


def test_a_lifecycle_yields_the_expected_rows(operator: Process, kubectl: Kubectl, postgres: Postgres) -> None:
    name = f"rec-{uuid.uuid4().hex[:6]}"
    kubectl.apply(make_env(name, 401, repo="octo/records", installationId=1))
    wait_phase(kubectl, name, "Ready")
    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    wait_for(lambda: phases(postgres.url, name)[-1:] == ["Ready"] and len(phases(postgres.url, name)) == 4)
    kubectl.run("delete", "pe", name, "--wait=true", "--timeout=90s")
    wait_for(lambda: phases(postgres.url, name) == LIFECYCLE, timeout=30, what="the whole lifecycle in the records")
    (row,) = history(postgres.url, name)
    assert row["phase"] == "Destroyed"
    assert row["repository"] == "octo/records"
    assert row["pull_request"] == 401
    assert row["commit_sha"] == SHA_B
    assert row["installation_id"] == 1
    assert row["namespace"].startswith("pr-401-octo-records-")
    assert row["ready_at"]
    assert row["destroyed_at"]
    assert row["created_at"]
    assert [e["from_phase"] for e in row["events"]] == [None, *LIFECYCLE[:-1]]
    listed = json.loads(cli(postgres.url, "environments", "list", "--phase", "Destroyed", "-o", "json").stdout)
    assert name in {r["name"] for r in listed}
    table = cli(postgres.url, "environments", "list", "--repository", "octo/records").stdout
    assert table.splitlines()[0].split()[:5] == ["NAME", "REPOSITORY", "PR", "COMMIT", "PHASE"]
    assert name in table


def test_postgres_outage_delays_nothing_and_records_catch_up(
    operator: Process, kubectl: Kubectl, postgres: Postgres
) -> None:
    names = [f"outage-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    postgres.stop()
    try:
        for i, name in enumerate(names):
            kubectl.apply(make_env(name, 410 + i, repo="octo/outage"))
        for name in names:
            wait_phase(kubectl, name, "Ready", timeout=30)  # the database being down holds nothing back
        kubectl.run("delete", "pe", names[0], "--wait=true", "--timeout=90s")
    finally:
        postgres.start()
    wait_for(
        lambda: phases(postgres.url, names[0]) == ["Provisioning", "Ready", "Destroying", "Destroyed"],
        timeout=90,
        what="the deleted environment's records to catch up",
    )
    wait_for(
        lambda: all(phases(postgres.url, n) == ["Provisioning", "Ready"] for n in names[1:]),
        timeout=60,
        what="the other environments' records to catch up",
    )


def test_migration_from_empty_to_head(postgres: Postgres, tmp_path: Path) -> None:
    sqlite_url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"

    async def create_database() -> str:
        engine = make_engine(postgres.url)
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("CREATE DATABASE migration_test")
        await engine.dispose()
        return postgres.url.rsplit("/", 1)[0] + "/migration_test"

    async def revision(url: str, check: bool = False) -> str | None:
        engine = make_engine(url)
        try:
            if check:
                await check_schema(engine)  # no complaint at head
            return await current_revision(engine)
        finally:
            await engine.dispose()

    pg_url = asyncio.run(create_database())
    for url in (sqlite_url, pg_url):
        assert asyncio.run(revision(url)) is None
        result = cli(url, "db", "upgrade")
        assert result.returncode == 0, result.stderr
        assert asyncio.run(revision(url, check=True)) == head_revision()
        assert cli(url, "environments", "list").returncode == 0


def test_operator_refuses_an_out_of_date_schema(control_plane: ControlPlane, tmp_path: Path) -> None:
    env = process_env(control_plane.kubeconfig, tmp_path)  # a fresh SQLite file: no schema at all
    proc = Process(["operator"], env, tmp_path / "operator.log", int(env["EPHEMERA_OPERATOR_PORT"])).start()
    assert proc.proc is not None
    try:
        code = proc.proc.wait(timeout=60)
    finally:
        proc.stop()
    assert code != 0
    assert "run `ephemera db upgrade`" in proc.log()


def _transition(uid: str, old: str | None, phase: str, at: str, **spec: Any) -> Transition:
    return Transition(
        name="pr-1-octo-unit",
        uid=uid,
        generation=1,
        spec={"repository": "octo/unit", "pullRequest": 1, "commitSha": "a" * 40, **spec},
        old_phase=parse_phase(old) if old else None,
        phase=parse_phase(phase),
        reason=phase,
        message=f"now {phase}",
        at=at,
        status={"namespace": "pr-1-octo-unit-x"},
        created="2026-01-01T00:00:00Z",
        occurred=datetime.datetime.fromisoformat(at.replace("Z", "+00:00")),
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'records.db'}"
    upgrade(url)
    return url


async def test_writing_a_transition_twice_records_it_once(sqlite_url: str) -> None:
    records = Records(make_engine(sqlite_url))
    t = _transition("u1", None, "Provisioning", "2026-01-01T00:00:01Z")
    await records.write(t)
    await records.write(t)
    await records.write(_transition("u1", "Provisioning", "Ready", "2026-01-01T00:00:02Z"))
    await records.engine.dispose()
    assert phases(sqlite_url, "pr-1-octo-unit") == ["Provisioning", "Ready"]


async def test_purge_removes_only_old_destroyed_records(sqlite_url: str) -> None:
    records = Records(make_engine(sqlite_url))
    old = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=8)).strftime("%Y-%m-%dT%H:%M:%SZ")
    recent = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for uid, at in (("old-1", old), ("old-2", old), ("recent", recent)):
        await records.write(_transition(uid, None, "Ready", at))
        await records.write(_transition(uid, "Ready", "Destroyed", at))
    await records.write(_transition("alive", None, "Ready", old))
    purged = await records.purge(datetime.timedelta(days=7), batch=1)
    await records.engine.dispose()
    assert purged == 2
    listed = json.loads(cli(sqlite_url, "environments", "list", "-o", "json").stdout)
    assert sorted(r["uid"] for r in listed) == ["alive", "recent"]


async def test_resync_writes_what_is_missing_and_nothing_twice(sqlite_url: str) -> None:
    from ephemera.store.records import _Resync

    records = Records(make_engine(sqlite_url))
    await records.write(_transition("kept", None, "Ready", "2026-01-01T00:00:05Z"))
    await records.write(_transition("behind", None, "Provisioning", "2026-01-01T00:00:01Z"))
    await records.write(_transition("vanished", None, "Ready", "2026-01-01T00:00:01Z"))

    def obj(uid: str, phase: str, at: str) -> dict[str, Any]:
        return {
            "metadata": {
                "name": f"name-{uid}",
                "uid": uid,
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {"repository": "octo/unit", "pullRequest": 1, "commitSha": "a" * 40},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "lastTransitionTime": at}]},
        }

    cluster = [
        obj("kept", "Ready", "2026-01-01T00:00:05Z"),
        obj("behind", "Ready", "2026-01-01T00:00:09Z"),
        obj("unknown", "Ready", "2026-01-01T00:00:07Z"),  # every transition of it was lost
    ]
    listed_at = datetime.datetime.now(datetime.UTC)
    for _ in range(2):  # the second resync finds nothing left to write
        await records._resync(_Resync(cluster, listed_at))
    await records.engine.dispose()
    (behind,) = history(sqlite_url, "name-behind")
    assert [(e["to_phase"], e["reason"]) for e in behind["events"]] == [
        ("Provisioning", "Provisioning"),
        ("Ready", "Resync"),
    ]
    (unknown,) = history(sqlite_url, "name-unknown")
    assert [e["to_phase"] for e in unknown["events"]] == ["Provisioning", "Ready"]
    assert unknown["phase"] == "Ready"
    others = {row["uid"]: row for row in history(sqlite_url, "pr-1-octo-unit")}
    # Up to date but with no provisioning on record: that gap is filled, the rest untouched.
    assert [(e["to_phase"], e["reason"]) for e in others["kept"]["events"]] == [
        ("Provisioning", "Resync"),
        ("Ready", "Ready"),
    ]
    # Its teardown was never recorded (an operator killed at the wrong moment): the resync fills the gap.
    assert [e["to_phase"] for e in others["vanished"]["events"]] == ["Ready", "Destroying", "Destroyed"]
    assert others["vanished"]["destroyed_at"]


def _listed(uid: str, phase: str, at: str, **status: Any) -> dict[str, Any]:
    """The object as a listing shows it (what a resync compares the rows with)."""
    return {
        "metadata": {
            "name": "pr-1-octo-unit",
            "uid": uid,
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"repository": "octo/unit", "pullRequest": 1, "commitSha": "a" * 40},
        "status": {"phase": phase, "conditions": [{"type": "Ready", "lastTransitionTime": at}], **status},
    }


def _at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_a_resync_places_what_it_rebuilds_after_what_is_recorded(sqlite_url: str) -> None:
    """An operator killed before its Ready reached the records: the resync rebuilds it from the object,
    whose time has whole seconds only, after the Provisioning recorded within that same second."""
    from ephemera.store.records import _Resync

    records = Records(make_engine(sqlite_url))
    provisioning = _transition("u1", None, "Provisioning", "2026-01-01T00:00:01Z")
    await records.write(dataclasses.replace(provisioning, occurred=_at("2026-01-01T00:00:01.600Z")))
    listing = [_listed("u1", "Ready", "2026-01-01T00:00:01Z", namespace="pr-1-octo-unit-x")]
    await records._resync(_Resync(listing, datetime.datetime.now(datetime.UTC)))
    await records.engine.dispose()
    (row,) = history(sqlite_url, "pr-1-octo-unit")
    assert [e["to_phase"] for e in row["events"]] == ["Provisioning", "Ready"]
    assert row["phase"] == "Ready"


async def test_a_resync_dates_a_phase_by_its_own_time_not_by_the_ready_condition(sqlite_url: str) -> None:
    """The Ready condition changes its time only when its status does (metav1.Condition): a Failed after
    a Provisioning keeps the time Ready became False. The phase's own time is status.lastTransitionTime."""
    from ephemera.store.records import _Resync

    records = Records(make_engine(sqlite_url))
    await records.write(_transition("u1", None, "Provisioning", "2026-01-01T00:00:01Z"))
    listing = [_listed("u1", "Failed", "2026-01-01T00:00:01Z", lastTransitionTime="2026-01-01T00:00:30Z")]
    await records._resync(_Resync(listing, datetime.datetime.now(datetime.UTC)))
    await records.engine.dispose()
    (row,) = history(sqlite_url, "pr-1-octo-unit")
    # SQLite hands back naive times (UTC).
    assert [(e["to_phase"], _at(e["at"]).replace(tzinfo=None)) for e in row["events"]] == [
        ("Provisioning", datetime.datetime(2026, 1, 1, 0, 0, 1)),
        ("Failed", datetime.datetime(2026, 1, 1, 0, 0, 30)),
    ]


async def test_a_transition_rebuilt_by_a_resync_and_announced_too_is_recorded_once(sqlite_url: str) -> None:
    """The resync's listing saw Ready before the writer got to the handler's own Ready."""
    from ephemera.store.records import _Resync

    records = Records(make_engine(sqlite_url))
    await records.write(_transition("u1", None, "Provisioning", "2026-01-01T00:00:01Z"))
    listing = [_listed("u1", "Ready", "2026-01-01T00:00:02Z", namespace="pr-1-octo-unit-x")]
    await records._resync(_Resync(listing, datetime.datetime.now(datetime.UTC)))
    live = _transition("u1", "Provisioning", "Ready", "2026-01-01T00:00:02Z")
    await records.write(dataclasses.replace(live, occurred=_at("2026-01-01T00:00:02.400Z")))
    # After a restart, kopf runs the teardown again and announces the end a second time.
    await records.write(_transition("u1", "Ready", "Destroying", "2026-01-01T00:00:03Z"))
    await records.write(_transition("u1", "Destroying", "Destroyed", "2026-01-01T00:00:04Z"))
    await records.write(_transition("u1", "Destroying", "Destroyed", "2026-01-01T00:00:09Z"))
    await records.engine.dispose()
    (row,) = history(sqlite_url, "pr-1-octo-unit")
    assert [e["to_phase"] for e in row["events"]] == ["Provisioning", "Ready", "Destroying", "Destroyed"]
    assert row["destroyed_at"].startswith("2026-01-01T00:00:04")


async def test_a_lost_transition_is_inferred_from_the_one_that_follows_it(sqlite_url: str) -> None:
    """Killed after its Destroying was written to the object but not to the records: the restarted
    operator's end says it came from Destroying, and carries when that began."""
    records = Records(make_engine(sqlite_url))
    await records.write(_transition("u1", None, "Provisioning", "2026-01-01T00:00:01Z"))
    await records.write(_transition("u1", "Provisioning", "Ready", "2026-01-01T00:00:02Z"))
    end = _transition("u1", "Destroying", "Destroyed", "2026-01-01T00:00:09Z")
    status = {"phase": "Destroying", "lastTransitionTime": "2026-01-01T00:00:05Z", "namespace": "pr-1-octo-unit-x"}
    await records.write(dataclasses.replace(end, status=status))
    await records.write(dataclasses.replace(end, status=status))  # and again: nothing more
    await records.engine.dispose()
    (row,) = history(sqlite_url, "pr-1-octo-unit")
    assert [(e["to_phase"], e["at"][:19]) for e in row["events"]] == [
        ("Provisioning", "2026-01-01T00:00:01"),
        ("Ready", "2026-01-01T00:00:02"),
        ("Destroying", "2026-01-01T00:00:05"),
        ("Destroyed", "2026-01-01T00:00:09"),
    ]
    assert row["phase"] == "Destroyed"


async def test_a_destroyed_environment_never_moves_back(sqlite_url: str) -> None:
    """A resync whose listing was taken before the deletion, and a late transition, change nothing."""
    from ephemera.store.records import _Resync

    records = Records(make_engine(sqlite_url))
    lifecycle = [
        (None, "Provisioning"),
        ("Provisioning", "Ready"),
        ("Ready", "Destroying"),
        ("Destroying", "Destroyed"),
    ]
    for second, (old, new) in enumerate(lifecycle, start=1):
        await records.write(_transition("u1", old, new, f"2026-01-01T00:00:0{second}Z"))
    before_deletion = [_listed("u1", "Ready", "2026-01-01T00:00:02Z", namespace="pr-1-octo-unit-x")]
    await records._resync(_Resync(before_deletion, _at("2026-01-01T00:00:03Z")))
    await records.write(_transition("u1", "Destroying", "Ready", "2026-01-01T00:00:08Z"))
    await records.engine.dispose()
    (row,) = history(sqlite_url, "pr-1-octo-unit")
    assert row["phase"] == "Destroyed"
    assert row["destroyed_at"].startswith("2026-01-01T00:00:04")
    assert [e["to_phase"] for e in row["events"]] == [new for _, new in lifecycle]


async def _database(postgres: Postgres, revision: str = "head") -> str:
    """A database of its own on the test server, migrated to `revision`."""
    name = f"records_{uuid.uuid4().hex[:8]}"
    engine = make_engine(postgres.url)
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.exec_driver_sql(f"CREATE DATABASE {name}")
    await engine.dispose()
    url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    await asyncio.to_thread(upgrade, url, revision)  # Alembic runs its own event loop
    return url


async def _eventually(check: Callable[[], Awaitable[Any]], within: float = 30.0, what: str = "") -> Any:
    """`wait_for` for a check that needs the event loop the writer runs on."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within} s waiting for {what}; last value {last!r}")


def _sample(name: str, **labels: str) -> float:
    from ephemera.metrics import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_record_that_can_never_be_written_does_not_hold_up_the_rest(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """PR 3,000,000,000 in the 32-bit column of schema 0001: a DataError, every time. It goes to the
    dead-letter log and metric, and the records behind it are written."""
    from ephemera.store.queries import list_environments

    url = await _database(postgres, "0001")
    records = Records(make_engine(url), max_delay=0.5)
    records.start()
    before = _sample("ephemera_record_dead_letters_total", reason="DBAPIError")
    huge = _transition("huge", None, "Provisioning", "2026-01-01T00:00:01Z", pullRequest=3_000_000_000)
    records.listener(huge)
    records.listener(_transition("after", None, "Provisioning", "2026-01-01T00:00:02Z", pullRequest=7))
    try:
        rows = await _eventually(
            lambda: list_environments(records.engine), within=30, what="the record queued behind the bad one"
        )
    finally:
        await records.stop()
    assert [row.uid for row in rows] == ["after"]
    assert _sample("ephemera_record_dead_letters_total", reason="DBAPIError") == before + 1
    dead = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(dead) == 1
    assert '"uid": "huge"' in dead[0]
    assert "3000000000" in dead[0]


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
async def test_pull_request_numbers_beyond_32_bits_are_recorded(
    database: str, postgres: Postgres, tmp_path: Path
) -> None:
    """The CRD allows int64 (up to its maximum); so does the column, after migration 0002."""
    url = await _database(postgres) if database == "postgresql" else f"sqlite+aiosqlite:///{tmp_path / 'big.db'}"
    if database == "sqlite":
        await asyncio.to_thread(upgrade, url)
    records = Records(make_engine(url))
    biggest = 2**63 - 1
    for uid, number in (("big", 3_000_000_000), ("biggest", biggest)):
        await records.write(_transition(uid, None, "Provisioning", "2026-01-01T00:00:01Z", pullRequest=number))
    await records.engine.dispose()
    listed = json.loads(cli(url, "environments", "list", "-o", "json").stdout)
    assert sorted(row["pull_request"] for row in listed) == [3_000_000_000, biggest]


async def test_a_full_queue_keeps_every_end_and_owes_a_resync() -> None:
    """A long outage (nothing listens where the database should be): the queue stops growing at
    its bound; an end (Destroyed) takes the place of another transition, which a resync rebuilds."""
    from devtools.controlplane import free_port
    from ephemera.api.models import DESTROYED
    from ephemera.store.records import _ResyncDue

    records = Records(make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"), queue_limit=5)
    records.start()
    dropped = _sample("ephemera_record_dropped_total")
    try:
        for i in range(20):
            records.listener(_transition(f"u{i}", None, "Provisioning", "2026-01-01T00:00:01Z"))
        ends = [_transition(f"u{i}", "Destroying", DESTROYED, "2026-01-01T00:00:02Z") for i in range(3)]
        for end in ends:
            records.listener(end)
        await _eventually(lambda: _async(not records.healthy), what="the writer to find the database away")
        assert records.backlog <= 5
        queued = [item for item in records._queue if not isinstance(item, _ResyncDue)]
        assert all(end in queued for end in ends)
        assert sum(isinstance(item, _ResyncDue) for item in records._queue) == 1  # owed, once
        assert _sample("ephemera_record_dropped_total") >= dropped + 18 - 5
        assert not await records.resync()  # one is queued already, and the writer is failing
    finally:
        records.drain_timeout = 0.5
        await records.stop()


async def _async(value: Any) -> Any:
    return value


def test_records_queued_at_shutdown_are_written_before_the_operator_exits(
    operator: Process, kubectl: Kubectl, postgres: Postgres, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """SIGTERM right after transitions that waited for the database: the operator writes them
    (within EPHEMERA_RECORD_DRAIN_TIMEOUT) before it exits, rather than leaving them to a resync."""
    from tests.conftest import http_ok
    from tests.test_chart import paused

    url = asyncio.run(_database(postgres))
    name = f"drain-{uuid.uuid4().hex[:6]}"
    with paused(operator):  # this test's operator is the only one
        env = process_env(control_plane.kubeconfig, tmp_path, EPHEMERA_DATABASE_URL=url)
        proc = Process(["operator"], env, tmp_path / "operator.log", int(env["EPHEMERA_OPERATOR_PORT"])).start()
        assert proc.proc is not None
        try:
            wait_for(lambda: http_ok(proc, "/healthz"), timeout=60, what="operator /healthz")
            postgres.stop()
            try:
                kubectl.apply(make_env(name, 430, repo="octo/drain"))
                wait_phase(kubectl, name, "Ready", timeout=60)  # queued, not written: the database is away
            finally:
                postgres.start()
            proc.proc.send_signal(signal.SIGTERM)
            proc.proc.wait(timeout=60)
        finally:
            proc.stop()
    try:
        assert phases(url, name) == ["Provisioning", "Ready"], proc.log()[-3000:]
    finally:
        kubectl.run("delete", "pe", name, "--wait=false")


def test_the_crd_bounds_pull_request_numbers_within_what_the_records_hold(crd: Path, kubectl: Kubectl) -> None:
    """2^53-1 at most: exact in the float64 the API server checks bounds with, and in every JSON
    client; the records column (BIGINT) holds all of it."""

    def accepted(number: int) -> bool:
        obj = make_env(f"bound-{uuid.uuid4().hex[:6]}", number, repo="octo/bound")
        return _dry_run(kubectl, obj)

    assert accepted(3_000_000_000)
    assert accepted(2**53 - 1)
    assert not accepted(2**53)


def _dry_run(kubectl: Kubectl, obj: dict[str, Any]) -> bool:
    result = kubectl.run("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode == 0 or "less than or equal to 9007199254740991" in result.stderr, result.stderr
    return result.returncode == 0


def test_an_environment_created_and_deleted_while_the_operator_was_down_is_recorded(
    operator: Process, kubectl: Kubectl, postgres: Postgres
) -> None:
    """The finalizer the webhook sets keeps a deleted object until the operator has seen it: the
    cluster still tells, and the records get its teardown (it was never provisioned, so no more)."""
    from ephemera.api.naming import FINALIZER
    from tests.test_chart import paused
    from tests.test_webhook import get_pe

    name = f"down-{uuid.uuid4().hex[:6]}"
    with paused(operator):
        obj = make_env(name, 440, repo="octo/down")
        obj["metadata"]["finalizers"] = [FINALIZER]
        kubectl.apply(obj)
        kubectl.run("delete", "pe", name, "--wait=false")
    wait_for(lambda: get_pe(kubectl, name) is None, timeout=90, what=f"{name} gone")
    wait_for(
        lambda: phases(postgres.url, name) == ["Destroying", "Destroyed"], timeout=60, what="its teardown recorded"
    )
    (row,) = history(postgres.url, name)
    assert row["phase"] == "Destroyed"
    assert row["destroyed_at"]


async def test_a_resync_rebuilds_a_ready_the_object_has_moved_on_from(sqlite_url: str) -> None:
    """Seen in a run of the kill test: Ready was queued, the operator killed, and killed again before
    its resync was written; the next resync found the object Destroying. provisionedAt (written with
    the first Ready) says it was Ready, within the second its Provisioning was recorded."""
    from ephemera.store.records import _Resync

    records = Records(make_engine(sqlite_url))
    provisioning = _transition("u1", None, "Provisioning", "2026-01-01T00:00:44Z")
    await records.write(dataclasses.replace(provisioning, occurred=_at("2026-01-01T00:00:44.700Z")))
    listing = [
        _listed(
            "u1",
            "Destroying",
            "2026-01-01T00:00:50Z",
            namespace="pr-1-octo-unit-x",
            provisionedAt="2026-01-01T00:00:44Z",
        )
    ]
    for _ in range(2):  # and a second resync finds nothing more to write
        await records._resync(_Resync(listing, datetime.datetime.now(datetime.UTC)))
    await records.engine.dispose()
    (row,) = history(sqlite_url, "pr-1-octo-unit")
    assert [e["to_phase"] for e in row["events"]] == ["Provisioning", "Ready", "Destroying"]
    assert row["phase"] == "Destroying"


async def test_a_ready_provisioned_again_after_a_kill_is_not_recorded_twice(sqlite_url: str) -> None:
    """Seen too: the rerun of the create handler (Provisioning, Ready) was lost in a second kill; the
    next resync found the object Ready since the rerun, and the rows Ready since the first time."""
    from ephemera.store.records import _Resync

    records = Records(make_engine(sqlite_url))
    await records.write(_transition("u1", None, "Provisioning", "2026-01-01T00:00:44Z"))
    await records.write(_transition("u1", "Provisioning", "Ready", "2026-01-01T00:00:45Z"))
    listing = [_listed("u1", "Ready", "2026-01-01T00:00:50Z", namespace="pr-1-octo-unit-x")]
    await records._resync(_Resync(listing, datetime.datetime.now(datetime.UTC)))
    await records.engine.dispose()
    (row,) = history(sqlite_url, "pr-1-octo-unit")
    assert [e["to_phase"] for e in row["events"]] == ["Provisioning", "Ready"]


async def test_a_transition_written_by_both_writers_of_a_handover_is_recorded_once(sqlite_url: str) -> None:
    """Seen at a reshard: a shard provisioned an object and moved it before its writer flushed; the new
    shard's first resync rebuilt Provisioning and Ready from the object, then the old writer wrote its
    own (all within one second, which is all Kubernetes keeps). One history, whichever writer is first."""
    from ephemera.store.records import _Resync

    created, second = "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z"
    provisioning = dataclasses.replace(
        _transition("u1", None, "Provisioning", second), created=created, occurred=_at("2026-01-01T00:00:01.350Z")
    )
    ready = dataclasses.replace(
        _transition("u1", "Provisioning", "Ready", second), created=created, occurred=_at("2026-01-01T00:00:01.400Z")
    )
    listing = [
        _listed(
            "u1",
            "Ready",
            second,
            lastTransitionTime=second,
            observedGeneration=1,
            provisionedAt=second,
            namespace="pr-1-octo-unit-x",
        )
    ]
    orders: list[list[Transition | None]] = [  # None: the resync
        [None, provisioning, ready],
        [provisioning, None, ready],
        [None, ready, provisioning],
        [ready, None, provisioning],
    ]
    for n, order in enumerate(orders):
        uid = f"u{n}"
        records = Records(make_engine(sqlite_url))
        for item in order:
            if item is None:
                objects = [{**o, "metadata": {**o["metadata"], "uid": uid, "name": f"pr-{n}"}} for o in listing]
                await records._resync(_Resync(objects, datetime.datetime.now(datetime.UTC)))
            else:
                await records.write(dataclasses.replace(item, uid=uid, name=f"pr-{n}"))
        await records.engine.dispose()
        (row,) = history(sqlite_url, f"pr-{n}")
        assert [e["to_phase"] for e in row["events"]] == ["Provisioning", "Ready"], order
        assert row["phase"] == "Ready"


def _queued_life(uid: str, admitted: str = "2026-01-01T00:05:00", ready: str | None = None) -> list[Transition]:
    """The handler's transitions of a life that began Queued (the lifecycle policy's cap): queued at its
    creation, admitted at `admitted` (by default minutes later) and Ready at once (Provisioning announced
    with Ready), in the same second or in `ready`'s (the provision ran past the second's end)."""
    created = "2026-01-01T00:00:00Z"
    ready = ready or admitted
    steps = [
        (None, "Queued", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00.300Z"),
        ("Queued", "Provisioning", f"{admitted}Z", f"{admitted}.500Z"),
        ("Provisioning", "Ready", f"{ready}Z", f"{ready}.600Z"),
    ]
    return [
        dataclasses.replace(_transition(uid, old, new, at), created=created, occurred=_at(occurred))
        for old, new, at, occurred in steps
    ]


def _ready_after_the_queue(uid: str, admitted: str = "2026-01-01T00:05:00") -> dict[str, Any]:
    """That object as a listing shows it once Ready (at `admitted`, its queue fields cleared at admission)."""
    ready = f"{admitted}Z"
    obj = _listed(
        uid, "Ready", ready, lastTransitionTime=ready, provisionedAt=ready, observedGeneration=1, namespace="ns-x"
    )
    return {**obj, "metadata": {**obj["metadata"], "name": f"pr-{uid}"}}


async def test_a_resync_of_a_life_that_began_queued_rebuilds_its_admission_after_the_queue(sqlite_url: str) -> None:
    """Only its Queued reached the records (its admission's died with a killed operator, or its old
    shard's writer had not flushed it at a handover): the Provisioning the resync rebuilds is the one
    that left the queue, after it, not a start of the life at its creation, before it."""
    from ephemera.store.records import _Resync

    records = Records(make_engine(sqlite_url))
    queued, _, _ = _queued_life("u1")
    await records.write(dataclasses.replace(queued, name="pr-u1"))
    for _ in range(2):  # and a second resync finds nothing more to write
        await records._resync(_Resync([_ready_after_the_queue("u1")], datetime.datetime.now(datetime.UTC)))
    await records.engine.dispose()
    (row,) = history(sqlite_url, "pr-u1")
    assert [(e["from_phase"], e["to_phase"]) for e in row["events"]] == [
        (None, "Queued"),
        ("Queued", "Provisioning"),
        (None, "Ready"),
    ]
    assert row["phase"] == "Ready"


@pytest.mark.parametrize(
    ("admitted", "ready"),
    [
        ("2026-01-01T00:05:00", "2026-01-01T00:05:00"),  # minutes later
        ("2026-01-01T00:00:00", "2026-01-01T00:00:00"),  # at once
        ("2026-01-01T00:05:00", "2026-01-01T00:05:01"),  # minutes later, Ready in the next second
    ],
)
@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
async def test_a_handover_of_a_life_that_began_queued_records_each_transition_once(
    database: str, admitted: str, ready: str, postgres: Postgres, sqlite_url: str
) -> None:
    """The handover race for an environment admitted from the queue: the old shard's writer writes its
    transitions in their order, the new shard's resync comes before, between or after any of them
    (before its Queued, it cannot tell that the life began queued: the status keeps no trace of the
    queue once admitted, so it guesses a start at the creation, which the Queued corrects). The
    provision may end in the second after the one it began in (the admission's): the resync, which
    dates the admission it rebuilds by the Ready's second, then names it otherwise than the handler."""
    from ephemera.store.records import _Resync

    url = await _database(postgres) if database == "postgresql" else sqlite_url
    for n in range(4):
        uid = f"u{n}"
        life = [dataclasses.replace(t, uid=uid, name=f"pr-{uid}") for t in _queued_life(uid, admitted, ready)]
        order: list[Transition | None] = [*life[:n], None, *life[n:]]  # None: the resync
        records = Records(make_engine(url))
        for item in order:
            if item is None:
                listing = [_ready_after_the_queue(uid, ready)]
                await records._resync(_Resync(listing, datetime.datetime.now(datetime.UTC)))
            else:
                await records.write(item)
        await records.engine.dispose()
        (row,) = history(url, f"pr-{uid}")
        written = ["resync" if t is None else t.phase.value for t in order]
        assert [(e["from_phase"], e["to_phase"], e["reason"]) for e in row["events"]] == [
            (None, "Queued", "Queued"),
            ("Queued", "Provisioning", "Provisioning"),
            ("Provisioning", "Ready", "Ready"),
        ], written
        assert row["phase"] == "Ready", written


async def test_the_handlers_own_reason_replaces_a_rebuilds_whichever_writer_is_first(sqlite_url: str) -> None:
    """A resync's rebuild knows the phase and its second, not why it came (reason Resync), what the
    handler said, or the phase left; the handler's own transition does. At a handover the two are one
    row (`event_id`); in either order that row says what the handler said."""
    from ephemera.store.records import _Resync

    second = "2026-01-01T00:00:01Z"
    live = [
        dataclasses.replace(_transition("u", None, "Provisioning", second), occurred=_at("2026-01-01T00:00:01.350Z")),
        dataclasses.replace(
            _transition("u", "Provisioning", "Ready", second), occurred=_at("2026-01-01T00:00:01.400Z")
        ),
    ]
    listing = _listed(
        "u", "Ready", second, lastTransitionTime=second, observedGeneration=1, provisionedAt=second, message="Resynced"
    )
    for n, resync_first in enumerate((True, False)):
        uid = f"r{n}"
        records = Records(make_engine(sqlite_url))
        resync = _Resync([{**listing, "metadata": {**listing["metadata"], "uid": uid, "name": f"pr-{uid}"}}], _now())
        if resync_first:
            await records._resync(resync)
        for t in live:
            await records.write(dataclasses.replace(t, uid=uid, name=f"pr-{uid}"))
        if not resync_first:
            await records._resync(resync)
        await records.engine.dispose()
        (row,) = history(sqlite_url, f"pr-{uid}")
        assert [(e["from_phase"], e["to_phase"], e["reason"], e["message"]) for e in row["events"]] == [
            (None, "Provisioning", "Provisioning", "now Provisioning"),
            ("Provisioning", "Ready", "Ready", "now Ready"),
        ], f"resync first: {resync_first}"
        assert row["phase"] == "Ready"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def test_the_handlers_own_reason_replaces_an_inferred_one(sqlite_url: str) -> None:
    """The end came first (its Destroying inferred from it, dated by the status), then the handler's own
    Destroying (a writer behind at a handover): one row, with what the handler said."""
    records = Records(make_engine(sqlite_url))
    await records.write(_transition("u1", None, "Provisioning", "2026-01-01T00:00:01Z"))
    await records.write(_transition("u1", "Provisioning", "Ready", "2026-01-01T00:00:02Z"))
    status = {"phase": "Destroying", "lastTransitionTime": "2026-01-01T00:00:05Z", "namespace": "pr-1-octo-unit-x"}
    end = _transition("u1", "Destroying", "Destroyed", "2026-01-01T00:00:09Z")
    await records.write(dataclasses.replace(end, status=status))
    await records.write(_transition("u1", "Ready", "Destroying", "2026-01-01T00:00:05Z"))
    await records.engine.dispose()
    (row,) = history(sqlite_url, "pr-1-octo-unit")
    assert [(e["to_phase"], e["reason"], e["at"][:19]) for e in row["events"]] == [
        ("Provisioning", "Provisioning", "2026-01-01T00:00:01"),
        ("Ready", "Ready", "2026-01-01T00:00:02"),
        ("Destroying", "Destroying", "2026-01-01T00:00:05"),
        ("Destroyed", "Destroyed", "2026-01-01T00:00:09"),
    ]


def _previous_release_id(t: Transition) -> str:
    """How the release before the shared event ids made an event's id (commit 2efe3ae changed it)."""
    from ephemera.store.records import ID_NAMESPACE

    return str(uuid.uuid5(ID_NAMESPACE, f"{t.uid}|{t.generation}|{t.old_phase}|{t.phase}|{t.reason}|{t.at}"))


async def test_rows_of_the_previous_release_are_not_recorded_again_after_an_upgrade(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows the previous release wrote have ids made the old way. After the upgrade (the chart's
    Recreate strategy: the old operator has drained its writer and exited) the new one's resync and
    its rerun handlers meet those rows: one history each, as the previous release would have kept it."""
    from ephemera.store import records as records_module
    from ephemera.store.records import _Resync

    def at(text: str, gen: int = 1, **status: Any) -> dict[str, Any]:
        obj = _listed("x", "Ready", text, lastTransitionTime=text, provisionedAt="2026-01-01T00:00:01Z", **status)
        return {**obj, "status": {**obj["status"], "observedGeneration": gen, "namespace": "ns-x"}}

    def live(uid: str, old: str | None, new: str, text: str, occurred: str, gen: int = 1) -> Transition:
        t = _transition(uid, old, new, text)
        return dataclasses.replace(t, name=f"pr-{uid}", generation=gen, occurred=_at(occurred))

    settled = [live("a", None, "Provisioning", "2026-01-01T00:00:01Z", "2026-01-01T00:00:01.350Z")]
    settled.append(live("a", "Provisioning", "Ready", "2026-01-01T00:00:01Z", "2026-01-01T00:00:01.400Z"))
    # Killed before kopf's patch of its Ready: the status has no phase; the new release reruns the handler.
    rerun = [live("b", None, "Provisioning", "2026-01-01T00:00:01Z", "2026-01-01T00:00:01.350Z")]
    # Its update's Ready was still queued when the old writer's drain ran out: the resync rebuilds it.
    cut = [dataclasses.replace(t, uid="c", name="pr-c") for t in settled]
    cut.append(live("c", "Ready", "Updating", "2026-01-01T00:00:05Z", "2026-01-01T00:00:05.100Z", gen=2))
    old = Records(make_engine(sqlite_url))
    with monkeypatch.context() as previous_release:
        previous_release.setattr(records_module, "event_id", _previous_release_id)
        for t in [*settled, *rerun, *cut]:
            await old.write(t)
    await old.engine.dispose()

    new = Records(make_engine(sqlite_url))
    listing = [
        {**at("2026-01-01T00:00:01Z"), "metadata": {**at("")["metadata"], "uid": "a", "name": "pr-a"}},
        {**_listed("b", "Ready", ""), "status": {}, "metadata": {**at("")["metadata"], "uid": "b", "name": "pr-b"}},
        {**at("2026-01-01T00:00:05Z", gen=2), "metadata": {**at("")["metadata"], "uid": "c", "name": "pr-c"}},
    ]
    for _ in range(2):  # and a second resync finds nothing more to write
        await new._resync(_Resync(listing, _now()))
    await new.write(live("b", None, "Provisioning", "2026-01-01T00:01:00Z", "2026-01-01T00:01:00.200Z"))
    await new.write(live("b", "Provisioning", "Ready", "2026-01-01T00:01:00Z", "2026-01-01T00:01:00.250Z"))
    await new.engine.dispose()
    found = {name: [e["to_phase"] for e in history(sqlite_url, f"pr-{name}")[0]["events"]] for name in "abc"}
    assert found == {
        "a": ["Provisioning", "Ready"],
        "b": ["Provisioning", "Ready"],
        "c": ["Provisioning", "Ready", "Updating", "Ready"],
    }
    assert {name: history(sqlite_url, f"pr-{name}")[0]["phase"] for name in "abc"} == dict.fromkeys("abc", "Ready")
    # The rows met were the previous release's, ids and all.
    assert [e["id"] for e in history(sqlite_url, "pr-a")[0]["events"]] == [_previous_release_id(t) for t in settled]
