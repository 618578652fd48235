"""Mirror every transition into the database, off the reconcile path, losing none.

Transitions are queued in memory and written in order by one task, each in its own short session.
A failed write (the database is down) is retried with backoff while the queue keeps growing; the
cluster never waits. Every event row's id is derived from the transition itself, so a write that
is repeated (after a crash, or by a resync) changes nothing. A resync compares the cluster with the
rows, at start and periodically, and writes what is missing.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy import case, delete, func
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlmodel import col, select

from ephemera.kube import Kube
from ephemera.metrics import REGISTRY
from ephemera.models import parse_time
from ephemera.store.tables import EnvironmentRow, EventRow
from ephemera.transitions import Transition

log = logging.getLogger(__name__)

WRITES = Counter("ephemera_record_writes", "Record writes by outcome.", ["outcome"], registry=REGISTRY)
BACKLOG = Gauge("ephemera_record_backlog", "Transitions waiting to be written.", registry=REGISTRY)
ID_NAMESPACE = uuid.UUID("6f0c4a8e-3a43-4c7e-9d4c-2f6d9a1e5b10")
DESTROYED = "Destroyed"


def event_id(t: Transition) -> str:
    key = f"{t.uid}|{t.generation}|{t.old_phase}|{t.phase}|{t.reason}|{t.at}"
    return str(uuid.uuid5(ID_NAMESPACE, key))


def _time(value: str | None) -> datetime.datetime | None:
    return parse_time(value)


def _aware(value: datetime.datetime) -> datetime.datetime:
    """SQLite hands back naive datetimes; they are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def _up_to_date(row_phase: str, latest: datetime.datetime | None, phase: str, at: datetime.datetime | None) -> bool:
    """Whether the rows already hold the object's last transition (Kubernetes keeps seconds only)."""
    if latest is None or at is None:
        return latest is not None
    latest = _aware(latest).replace(microsecond=0)
    return latest > at or (latest == at and row_phase == phase)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Records:
    """The writer: `listener` for the transitions, `run` as a background task."""

    def __init__(self, engine: AsyncEngine, kube: Kube | None = None, max_delay: float = 30.0) -> None:
        self.engine = engine
        self.kube = kube
        self.max_delay = max_delay
        self._queue: asyncio.Queue[Transition | _Resync] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.healthy = True

    # Producers ---------------------------------------------------------------------------------------

    def listener(self, transition: Transition) -> None:
        """Called from handler threads after each transition."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._put, transition)

    def _put(self, item: Transition | _Resync) -> None:
        self._queue.put_nowait(item)
        BACKLOG.set(self._queue.qsize())

    async def resync(self) -> None:
        """Queue a comparison of the cluster (as it is now) with the rows."""
        if self.kube is None:
            return
        listed_at = _now()
        objects = await asyncio.to_thread(lambda: list(self.kube.list_environments()) if self.kube else [])
        self._put(_Resync(objects, listed_at))

    # The writer ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="records-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.engine.dispose()

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            delay = 0.5
            while True:
                try:
                    if isinstance(item, _Resync):
                        await self._resync(item)
                    else:
                        await self.write(item)
                except Exception as err:  # any database failure: keep the item, wait, try again
                    WRITES.labels("retry").inc()
                    if self.healthy:
                        log.warning("records database unavailable (%s); will retry, nothing is lost", err)
                    self.healthy = False
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_delay)
                    continue
                if not self.healthy:
                    log.info("records database reachable again; catching up (%d queued)", self._queue.qsize())
                self.healthy = True
                WRITES.labels("success").inc()
                break
            self._queue.task_done()
            BACKLOG.set(self._queue.qsize())

    async def write(self, t: Transition, *, history_only: bool = False) -> None:
        """Upsert the environment's row and add the event row (a no-op if written before).

        `history_only` adds the event to an existing row without changing it (a gap filled later)."""
        at = t.occurred
        async with AsyncSession(self.engine) as session, session.begin():
            row = await session.get(EnvironmentRow, t.uid)
            if row is not None and history_only:
                await session.execute(self._insert_event(t, at))
                return
            if row is None:
                row = EnvironmentRow(
                    uid=t.uid,
                    name=t.name,
                    repository=str(t.spec["repository"]),
                    pull_request=int(t.spec["pullRequest"]),
                    commit_sha=str(t.spec["commitSha"]),
                    phase=t.phase,
                    created_at=_time(t.created),
                    updated_at=at,
                )
                session.add(row)
            row.name = t.name
            row.commit_sha = str(t.spec["commitSha"])
            row.installation_id = t.spec.get("installationId", row.installation_id)
            row.namespace = t.status.get("namespace") or row.namespace
            row.phase = t.phase
            row.message = t.message
            row.updated_at = at
            if t.phase == "Ready" and row.ready_at is None:
                row.ready_at = at
            if t.phase == DESTROYED:
                row.destroyed_at = at
            await session.flush()
            await session.execute(self._insert_event(t, at))

    def _insert_event(self, t: Transition, at: datetime.datetime) -> Any:
        values = {
            "id": event_id(t),
            "environment_uid": t.uid,
            "at": at,
            "from_phase": t.old_phase,
            "to_phase": t.phase,
            "reason": t.reason[:128],
            "message": t.message,
        }
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(EventRow).values(**values).on_conflict_do_nothing(index_elements=["id"])

    async def _resync(self, job: _Resync) -> None:
        """Write what the rows miss; one query for all the live rows, whatever their number."""
        async with AsyncSession(self.engine) as session:
            latest_at = func.max(EventRow.at)
            provisioned = func.sum(case((col(EventRow.to_phase) == "Provisioning", 1), else_=0))
            query = (
                sa_select(  # sqlmodel's select takes at most four columns
                    col(EnvironmentRow.uid),
                    col(EnvironmentRow.phase),
                    col(EnvironmentRow.updated_at),
                    latest_at,
                    provisioned,
                )
                .join(EventRow, col(EventRow.environment_uid) == col(EnvironmentRow.uid), isouter=True)
                .where(col(EnvironmentRow.destroyed_at).is_(None))
                .group_by(col(EnvironmentRow.uid), col(EnvironmentRow.phase), col(EnvironmentRow.updated_at))
            )
            found = list(await session.execute(query))
            rows = {uid: (phase, updated, latest) for uid, phase, updated, latest, _ in found}
            begun = {uid for uid, _, _, _, count in found if count}
        seen: set[str] = set()
        written = 0
        for obj in job.objects:
            meta, status = obj["metadata"], obj.get("status") or {}
            seen.add(meta["uid"])
            phase = status.get("phase")
            conditions = status.get("conditions") or [{}]
            at_text = conditions[0].get("lastTransitionTime") or status.get("lastTransitionTime")
            if not phase or not at_text:
                continue
            row = rows.get(meta["uid"])
            if meta["uid"] not in begun and phase != "Provisioning" and meta.get("creationTimestamp"):
                # Its first transitions died with a killed operator: its life began with provisioning
                # when it was created.
                first = _resync_transition(obj, "Provisioning", meta["creationTimestamp"])
                await self.write(first, history_only=row is not None)
                written += 1
            if row is not None and _up_to_date(row[0], row[2], phase, _time(at_text)):
                continue
            await self.write(_resync_transition(obj, phase, at_text))
            written += 1
        gone = [uid for uid, (_, updated, _) in rows.items() if uid not in seen and _aware(updated) < job.listed_at]
        for uid in gone:
            async with AsyncSession(self.engine) as session:
                row_obj = await session.get(EnvironmentRow, uid)
            if row_obj is not None:
                if row_obj.phase != "Destroying":  # its teardown began before the end was recorded
                    began = job.listed_at - datetime.timedelta(milliseconds=1)  # so that it sorts first
                    await self.write(_destroyed_transition(row_obj, began, "Destroying"))
                    row_obj.phase = "Destroying"
                    written += 1
                await self.write(_destroyed_transition(row_obj, job.listed_at))
                written += 1
        if written:
            log.info("resync wrote %d missing transition(s)", written)

    async def purge(self, older_than: datetime.timedelta, batch: int) -> int:
        """Delete destroyed environments (and their events) older than the retention, `batch` at a time."""
        cutoff = _now() - older_than
        total = 0
        while True:
            async with AsyncSession(self.engine) as session, session.begin():
                uids = list(
                    (
                        await session.execute(
                            select(EnvironmentRow.uid).where(col(EnvironmentRow.destroyed_at) < cutoff).limit(batch)
                        )
                    ).scalars()
                )
                if not uids:
                    return total
                await session.execute(delete(EventRow).where(col(EventRow.environment_uid).in_(uids)))
                await session.execute(delete(EnvironmentRow).where(col(EnvironmentRow.uid).in_(uids)))
            total += len(uids)


class _Resync:
    def __init__(self, objects: Iterable[dict[str, Any]], listed_at: datetime.datetime) -> None:
        self.objects = list(objects)
        self.listed_at = listed_at


def _resync_transition(obj: dict[str, Any], phase: str, at: str) -> Transition:
    meta, status = obj["metadata"], obj.get("status") or {}
    return Transition(
        name=meta["name"],
        uid=meta["uid"],
        generation=int(meta.get("generation", 1)),
        spec=dict(obj.get("spec") or {}),
        old_phase=None,
        phase=phase,
        reason="Resync",
        message=str(status.get("message") or ""),
        at=at,
        status=dict(status),
        created=meta.get("creationTimestamp"),
        occurred=_time(at) or _now(),
    )


def _destroyed_transition(row: EnvironmentRow, at: datetime.datetime, phase: str = DESTROYED) -> Transition:
    stamp = at.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return Transition(
        name=row.name,
        uid=row.uid,
        generation=0,
        spec={"repository": row.repository, "pullRequest": row.pull_request, "commitSha": row.commit_sha},
        old_phase=row.phase,
        phase=phase,
        reason="Resync",
        message="The object is gone from the cluster",
        at=stamp,
        status={"namespace": row.namespace},
        occurred=at,
    )
