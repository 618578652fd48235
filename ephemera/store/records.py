"""Mirror every transition into the database, off the reconcile path, losing none.

Transitions are queued in memory and written in order by one task, each in its own short session.
A write that fails for a reason that passes (the database is down, a connection dropped) is retried
with backoff while the cluster goes on; one that can never succeed (a value a column refuses, a row
that breaks a constraint) goes to the dead-letter log and metric, so that it never holds up the
records queued behind it. The queue is bounded (EPHEMERA_RECORD_QUEUE_LIMIT); on stop it is
drained for at most EPHEMERA_RECORD_DRAIN_TIMEOUT seconds.

The history of an environment is kept true whatever order and however often its transitions
arrive: every event row's id is derived from the transition, so a repeated write changes nothing; a
resync's rebuild of a transition from the object has the same id as the handler's own (`event_id`),
so that the two collapse into one row in whichever order they come (after a handover between
shards, the new shard's resync may write it before the old shard's writer does), and that row then
says what the handler said (a rebuild knows neither why nor the phase left); the handler's own
transitions correct what a resync had to guess (a life's start, the place of a rebuild within its
second: `_correct_rebuilds`); a transition into
the phase the history already holds at that moment is not a new one (announced again after a
crash, or rebuilt by a resync); a transition whose `old_phase` the history lacks
brings that phase along (its own record died with a killed operator); and a destroyed
environment's row never changes phase again. A resync compares the cluster with the rows, at start
and periodically, and writes what is missing. Its listing is taken when the writer reaches it, so
the rows it is compared with are never newer than the listing.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy import case, delete, func, update
from sqlalchemy import exc as sa_exc
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlmodel import col, select

from ephemera import backoff
from ephemera.api.models import DESTROYED, Phase, TransitionPhase, parse_phase, parse_time
from ephemera.api.naming import SHARD_LABEL, shard_of
from ephemera.kube import Kube, KubeError
from ephemera.metrics import REGISTRY
from ephemera.store.tables import EnvironmentRow, EventRow
from ephemera.transitions import Transition

log = logging.getLogger(__name__)

WRITES = Counter("ephemera_record_writes", "Record writes by outcome.", ["outcome"], registry=REGISTRY)
BACKLOG = Gauge("ephemera_record_backlog", "Transitions waiting to be written.", registry=REGISTRY)
DEAD_LETTERS = Counter(
    "ephemera_record_dead_letters",
    "Records that can never be written, logged in full as dead letters instead, by reason.",
    ["reason"],
    registry=REGISTRY,
)
DROPPED = Counter(
    "ephemera_record_dropped",
    "Transitions dropped at the queue bound (EPHEMERA_RECORD_QUEUE_LIMIT); a resync rebuilds them.",
    registry=REGISTRY,
)
RESYNCS = Counter("ephemera_record_resyncs", "Resyncs of the records by outcome.", ["outcome"], registry=REGISTRY)
ID_NAMESPACE = uuid.UUID("6f0c4a8e-3a43-4c7e-9d4c-2f6d9a1e5b10")
TICK = datetime.timedelta(microseconds=1)
FIRST_DELAY = 0.5  # bound of the first wait for an unavailable database; doubles up to max_delay
# SQLSTATE classes of errors that pass: connection exception, insufficient resources, operator
# intervention (shutdown, "cannot connect now"), system error; and single states worth a retry.
TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58")
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})  # serialization, deadlock, lock not available
# A resync infers that an environment was provisioned once in these phases (or with these status fields).
PROVISIONED_PHASES = frozenset({Phase.READY, Phase.UPDATING})
# The reasons of transitions the records rebuilt (a resync's from the object, one inferred from the next):
# they know the phase and when, not why, what was said, nor (a resync's) the phase left.
RESYNC = "Resync"
INFERRED = "Inferred"
REBUILT_REASONS = frozenset({RESYNC, INFERRED})


def _start_id(uid: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{uid}|start"))


def event_id(t: Transition) -> str:
    """The identity of a transition, made only of what both its writers know of it.

    The handler's own transition and a resync's rebuild of it from the object can be written by two
    operators (a shard that moved the object before its writer flushed, and the new shard's first
    resync), in either order and at different microsecond times. So the id holds neither the reason
    nor the phase left, nor the time to the microsecond, which a rebuild cannot know: only the
    environment, the generation that reached the phase and when the phase began, as the status
    keeps it (status.observedGeneration, status.lastTransitionTime, to the second). The beginning of
    an environment's life (Provisioning from no phase) happens once; a resync dates it by the
    object's creation, so its id is the environment's alone."""
    if t.old_phase is None and t.phase is Phase.PROVISIONING:
        return _start_id(t.uid)
    return str(uuid.uuid5(ID_NAMESPACE, f"{t.uid}|{t.generation}|{t.phase}|{_second(t.at)}"))


def _second(at: str) -> str:
    """`at` as Kubernetes writes a time, whatever form it came in (a listing hands back what was written)."""
    parsed = parse_time(at)
    return _stamp(_aware(parsed)) if parsed is not None else at


def transient(err: BaseException) -> bool:
    """Whether the same write may succeed later: the database (or the cluster) is away, the row is fine.

    Anything else (DataError, IntegrityError, ProgrammingError, a transition that cannot be read)
    fails the same way every time, and would block every record behind it if retried."""
    if isinstance(err, KubeError):
        return err.temporary
    if isinstance(err, OSError | TimeoutError | sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True
    if not isinstance(err, sa_exc.DBAPIError):
        return False
    if err.connection_invalidated or isinstance(err, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    code = getattr(err.orig, "sqlstate", None) or getattr(err.orig, "pgcode", None)
    if isinstance(code, str) and code:
        return code[:2] in TRANSIENT_SQLSTATE_CLASSES or code in TRANSIENT_SQLSTATES
    return isinstance(getattr(err.orig, "__cause__", None), OSError | TimeoutError)


def _time(value: str | None) -> datetime.datetime | None:
    return parse_time(value)


def _aware(value: datetime.datetime) -> datetime.datetime:
    """SQLite hands back naive datetimes; they are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def _stamp(value: datetime.datetime) -> str:
    return value.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _up_to_date(
    row_phase: str, latest: datetime.datetime | None, phase: TransitionPhase, at: datetime.datetime | None
) -> bool:
    """Whether the rows already hold the object's last transition (Kubernetes keeps seconds only)."""
    if latest is None or at is None:
        return latest is not None
    latest = _aware(latest).replace(microsecond=0)
    return latest > at or (latest == at and row_phase == phase.value)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(frozen=True)
class _Event:
    """A recorded event, as `write` compares a transition with the history."""

    phase: str
    at: datetime.datetime
    id: str
    reason: str


def _rebuilt_later(t: Transition, found: list[_Event]) -> _Event | None:
    """A resync's rebuild of `t` itself, dated by a later second than `t`'s and so recorded under
    another id: the guess (reason Resync) into `t`'s phase right after `t`'s time, with the phase `t`
    left right before it (a history never holds a phase twice in a row: the two are one transition).
    A resync dates an admission from the queue by the first Ready's second, and the handler decided it
    before the provision, which may end in the next second."""
    before = [e for e in found if e.at <= t.occurred]
    after = [e for e in found if e.at > t.occurred]
    if not after or after[0].phase != t.phase.value or after[0].reason != RESYNC:
        return None
    left = t.old_phase.value if t.old_phase is not None else None
    return after[0] if (before[-1].phase if before else None) == left else None


class _ResyncDue:
    """A resync waiting in the queue; its listing is taken when the writer reaches it."""


class _Resync:
    """A listing of the cluster to compare the rows with, and when it was taken."""

    def __init__(self, objects: Iterable[dict[str, Any]], listed_at: datetime.datetime) -> None:
        self.objects = list(objects)
        self.listed_at = listed_at


class Records:
    """The writer: `listener` for the transitions, `start`/`stop` around the background task."""

    def __init__(
        self,
        engine: AsyncEngine,
        kube: Kube | None = None,
        max_delay: float = 30.0,
        *,
        queue_limit: int = 10_000,
        drain_timeout: float = 10.0,
        shards: int = 1,
        shard: int = 0,
    ) -> None:
        self.engine = engine
        # The database is shared by every shard: a resync lists this shard's objects and judges only
        # the rows of this shard's repositories (others' are not lost, only not listed here).
        self.shards = shards
        self.shard = shard
        self.kube = kube
        self.max_delay = max_delay
        self.queue_limit = queue_limit
        self.drain_timeout = drain_timeout
        self._queue: collections.deque[Transition | _ResyncDue] = collections.deque()
        self._waiting = 0  # transitions in the queue; a resync waiting there is not one
        self._current: Transition | _ResyncDue | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._retry_now = asyncio.Event()
        self._resync_queued = False  # one is in the queue or running: another would find nothing more
        self._resync_owed = False  # transitions were dropped since the last listing: one must run again
        self._dropping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.healthy = True

    @property
    def backlog(self) -> int:
        return self._waiting + isinstance(self._current, Transition)

    # Producers ---------------------------------------------------------------------------------------

    def listener(self, transition: Transition) -> None:
        """Called from handler threads after each transition."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._put, transition)

    def _put(self, item: Transition) -> None:
        if self._waiting >= self.queue_limit and not self._make_room(item):
            return
        self._queue.append(item)
        self._waiting += 1
        self._queued()

    def _queued(self) -> None:
        BACKLOG.set(self.backlog)
        self._idle.clear()
        self._wake.set()

    def _make_room(self, item: Transition) -> bool:
        """The queue is full (a long database outage): whether `item` may go in after all.

        Dropping is safe because a resync is then owed, and it runs after every transition queued
        before it, that is once the database answers again: it rebuilds every environment that
        still exists from the cluster and closes the row of every one that is gone. What it cannot
        rebuild is an environment that is gone and never had a row, so an end (Destroyed) takes
        the place of the oldest other transition instead of being dropped, and is dead-lettered
        (logged in full) only when the queue holds nothing but ends."""
        DROPPED.inc()
        self._owe_resync()
        if not self._dropping:
            log.warning(
                "records queue full (%d transitions, EPHEMERA_RECORD_QUEUE_LIMIT); dropping transitions until the "
                "database answers again, then a resync rebuilds them from the cluster",
                self._waiting,
            )
            self._dropping = True
        if item.phase is not DESTROYED:
            return False
        for index, queued in enumerate(self._queue):
            if isinstance(queued, Transition) and queued.phase is not DESTROYED:
                del self._queue[index]
                self._waiting -= 1
                return True
        self._dead_letter(item, "queue full")
        return False

    def _owe_resync(self) -> None:
        self._resync_owed = True
        if not self._resync_queued:
            self._queue_resync()

    def _queue_resync(self) -> None:
        self._resync_queued = True
        self._queue.append(_ResyncDue())
        self._queued()

    async def resync(self) -> bool:
        """Queue a comparison of the cluster with the rows; whether one was queued.

        Skipped while one is queued or running (it will see all there is), and while the writer is
        failing: nothing is lost then (the queue holds the transitions, and a resync is owed for any
        that were dropped), while a listing queued behind an outage would only be stale and big."""
        if self.kube is None:
            return False
        if self._resync_queued or not self.healthy:
            RESYNCS.labels("skipped").inc()
            return False
        self._queue_resync()
        return True

    # The writer ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="records-writer")

    async def stop(self) -> None:
        """Write what is queued, for at most `drain_timeout` seconds, then stop.

        A resync still queued is dropped (the next start runs one at once); what the deadline cuts
        off is rebuilt by that resync, for every environment the cluster still holds."""
        if self._task is not None:
            self._retry_now.set()
            for item in [i for i in self._queue if isinstance(i, _ResyncDue)]:
                self._queue.remove(item)
            if not self._queue and self._current is None:
                self._idle.set()
            try:
                await asyncio.wait_for(self._idle.wait(), self.drain_timeout)
            except TimeoutError:
                log.warning(
                    "records: %d transition(s) not written within EPHEMERA_RECORD_DRAIN_TIMEOUT=%.0f s; "
                    "the next start's resync rebuilds them from the cluster",
                    self.backlog,
                    self.drain_timeout,
                )
            self._loop = None  # later transitions have nobody to write them
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.engine.dispose()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._current = self._queue.popleft()
            if isinstance(item, Transition):
                self._waiting -= 1
            try:
                await self._process(item)
            finally:
                self._current = None
                if isinstance(item, _ResyncDue):
                    self._resync_queued = False
                    if self._resync_owed:  # more was dropped while it ran
                        self._queue_resync()
                BACKLOG.set(self.backlog)

    async def _process(self, item: Transition | _ResyncDue) -> None:
        attempt = 0
        while True:
            try:
                if isinstance(item, _ResyncDue):
                    await self._run_resync()
                else:
                    await self.write(item)
            except Exception as err:
                if not transient(err):
                    self._reachable()
                    if isinstance(item, _ResyncDue):
                        WRITES.labels("failure").inc()
                        log.exception("resync failed; the next one tries again")
                    else:
                        self._dead_letter(item, err)
                    return
                WRITES.labels("retry").inc()
                if self.healthy:
                    log.warning("records database unavailable (%s); will retry, nothing is lost", err)
                self.healthy = False
                try:  # a stop cuts the wait short: the drain starts over with short waits
                    await asyncio.wait_for(self._retry_now.wait(), backoff.delay(attempt, FIRST_DELAY, self.max_delay))
                    self._retry_now.clear()
                    attempt = 0
                except TimeoutError:
                    attempt += 1
                continue
            self._reachable()
            WRITES.labels("success").inc()
            return

    def _reachable(self) -> None:
        if not self.healthy:
            log.info("records database reachable again; catching up (%d queued)", self._waiting)
        self.healthy = True
        if self._dropping and self._waiting < self.queue_limit:
            self._dropping = False

    def _dead_letter(self, t: Transition, err: BaseException | str) -> None:
        """Keep a record that can never be written where an operator finds it: the log, in full."""
        reason = err if isinstance(err, str) else type(err).__name__
        DEAD_LETTERS.labels(reason).inc()
        record = dataclasses.asdict(t)
        log.error(
            "record dead-lettered (%s): %s; transition: %s",
            reason,
            str(err).splitlines()[0][:500] if str(err) else reason,
            json.dumps(record, default=str, sort_keys=True),
        )

    async def write(self, t: Transition) -> None:
        """Record `t`: its event in the environment's history, and the row when it is the newest.

        Nothing is written when the event is there already, when the history holds the same phase
        right before or right after it, or when the environment is destroyed and `t` is its end
        again or comes after it: a destroyed row never changes phase again."""
        at = t.occurred
        async with AsyncSession(self.engine) as session, session.begin():
            row = await session.get(EnvironmentRow, t.uid)
            history: list[tuple[str, datetime.datetime]] = []
            if row is None:
                row = EnvironmentRow(
                    uid=t.uid,
                    name=t.name,
                    repository=str(t.spec["repository"]),
                    pull_request=int(t.spec["pullRequest"]),
                    commit_sha=str(t.spec["commitSha"]),
                    phase=t.phase.value,
                    created_at=_time(t.created),
                    updated_at=at,
                )
                session.add(row)
            else:
                query = (
                    sa_select(col(EventRow.to_phase), col(EventRow.at), col(EventRow.id), col(EventRow.reason))
                    .where(col(EventRow.environment_uid) == t.uid)
                    .order_by(col(EventRow.at), col(EventRow.id))
                )
                found: list[_Event] = [
                    _Event(phase, _aware(when), known, reason)
                    for phase, when, known, reason in await session.execute(query)
                ]
                own = event_id(t)
                recorded = [event.reason for event in found if event.id == own]
                if recorded:  # written already, by this writer or by another's rebuild of it
                    if recorded[0] in REBUILT_REASONS and t.reason not in REBUILT_REASONS:
                        await session.execute(self._own_account(t, own))
                    return
                if t.reason not in REBUILT_REASONS:
                    corrected = await self._correct_rebuilds(session, t, found)
                    if corrected is None:
                        return
                    found = corrected
                    guess = _rebuilt_later(t, found)
                    if guess is not None:
                        await session.execute(self._own_account(t, guess.id))
                        return
                history = [(event.phase, event.at) for event in found]
            destroyed = row.destroyed_at is not None
            if destroyed and (t.phase is DESTROYED or at >= _aware(row.destroyed_at or at)):
                return  # after the end: a late or stale transition cannot bring the environment back
            before = [event for event in history if event[1] <= at]
            after = [event for event in history if event[1] > at]
            previous = before[-1] if before else None
            following = after[0] if after else None
            events: list[Transition] = []
            # The history's rows hold phases as text: compared with the transition's by value.
            again = (previous is not None and previous[0] == t.phase.value) or (
                following is not None and following[0] == t.phase.value
            )
            if not again:
                old = t.old_phase
                if old is not None and old is not t.phase and (previous is None or previous[0] != old.value):
                    events.append(_implied(t, old, previous))  # lost: the history lacks the phase `t` left
                events.append(t)
            if following is None and not destroyed:  # the newest: the row shows it
                row.name = t.name
                row.commit_sha = str(t.spec["commitSha"])
                row.installation_id = t.spec.get("installationId", row.installation_id)
                row.namespace = t.status.get("namespace") or row.namespace
                row.phase = t.phase.value
                row.message = t.message
                row.updated_at = at
                if t.phase is Phase.READY and row.ready_at is None:
                    row.ready_at = at
                if t.phase is DESTROYED:
                    row.destroyed_at = at
            await session.flush()
            for event in events:
                await session.execute(self._insert_event(event, event.occurred))

    async def _correct_rebuilds(self, session: AsyncSession, t: Transition, found: list[_Event]) -> list[_Event] | None:
        """Correct what a resync guessed by what the handler's own `t` says; the history after it, or
        None when `t` took the place of a guess (nothing more to write).

        A resync that finds no start of a life on record assumes it began with Provisioning at its
        creation (the status keeps no trace of a queue once it is left): a start from no phase into
        another phase (Queued) is the true one, and takes the guess's place (its time, the creation,
        stays first). A resync dates what it rebuilds by the second Kubernetes keeps, at the second's
        beginning, while the handler's transitions within that second carry their microseconds: when
        `t` came from the phase recorded right before rebuilt rows of its own second, those rows came
        after it (their phases followed the one `t` entered), and move to just after it."""
        if t.old_phase is None:
            start = _start_id(t.uid)
            guess = [e for e in found if e.id == start and e.reason == RESYNC and e.phase != t.phase.value]
            if guess:  # (a start into Provisioning has the guess's own id: recorded already)
                values = {"to_phase": t.phase.value, "reason": t.reason[:128], "message": t.message}
                await session.execute(update(EventRow).where(col(EventRow.id) == start).values(**values))
                return None
            return found
        before = [e for e in found if e.at <= t.occurred]
        after = [e for e in found if e.at > t.occurred]
        second = t.occurred.replace(microsecond=0)
        run: list[_Event] = []
        while (
            before and before[-1].reason == RESYNC and before[-1].at >= second and before[-1].phase != t.old_phase.value
        ):
            run.insert(0, before.pop())
        moved = [dataclasses.replace(e, at=t.occurred + TICK * n) for n, e in enumerate(run, start=1)]
        if not run or not before or before[-1].phase != t.old_phase.value or (after and after[0].at <= moved[-1].at):
            return found
        for event in moved:
            await session.execute(update(EventRow).where(col(EventRow.id) == event.id).values(at=event.at))
        return [*before, *moved, *after]

    def _own_account(self, t: Transition, own: str) -> Any:
        """The handler's own `t` replaces what a rebuild of it (row `own`) could not know: why it came,
        what was said and the phase left. Not when: the rebuild's time, placed among the others, stays."""
        values: dict[str, Any] = {"reason": t.reason[:128], "message": t.message}
        if t.old_phase is not None:
            values["from_phase"] = t.old_phase.value
        return update(EventRow).where(col(EventRow.id) == own).values(**values)

    def _insert_event(self, t: Transition, at: datetime.datetime) -> Any:
        values = {
            "id": event_id(t),
            "environment_uid": t.uid,
            "at": at,
            "from_phase": t.old_phase.value if t.old_phase is not None else None,
            "to_phase": t.phase.value,
            "reason": t.reason[:128],
            "message": t.message,
        }
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(EventRow).values(**values).on_conflict_do_nothing(index_elements=["id"])

    async def _run_resync(self) -> None:
        if self.kube is None:
            return
        kube = self.kube
        self._resync_owed = False  # this listing sees every transition dropped before it
        listed_at = _now()
        selector = f"{SHARD_LABEL}={self.shard}" if self.shards > 1 else None
        objects = await asyncio.to_thread(lambda: list(kube.list_environments(selector)))
        await self._resync(_Resync(objects, listed_at))
        RESYNCS.labels("run").inc()

    async def _resync(self, job: _Resync) -> None:
        """Write what the rows miss; one query for all the live rows, whatever their number."""
        listed = {obj["metadata"]["uid"] for obj in job.objects}
        async with AsyncSession(self.engine) as session:
            latest_at = func.max(EventRow.at)
            provisioned = func.min(case((col(EventRow.to_phase) == "Provisioning", col(EventRow.at)), else_=None))
            entered_queue = func.min(case((col(EventRow.to_phase) == "Queued", col(EventRow.at)), else_=None))
            readied = func.sum(case((col(EventRow.to_phase) == "Ready", 1), else_=0))
            query = (
                sa_select(  # sqlmodel's select takes at most four columns
                    col(EnvironmentRow.uid),
                    col(EnvironmentRow.phase),
                    col(EnvironmentRow.updated_at),
                    latest_at,
                    provisioned,
                    readied,
                    col(EnvironmentRow.repository),
                    entered_queue,
                )
                .join(EventRow, col(EventRow.environment_uid) == col(EnvironmentRow.uid), isouter=True)
                .where(col(EnvironmentRow.destroyed_at).is_(None))
                .group_by(
                    col(EnvironmentRow.uid),
                    col(EnvironmentRow.phase),
                    col(EnvironmentRow.updated_at),
                    col(EnvironmentRow.repository),
                )
            )
            found = list(await session.execute(query))
            rows = {uid: (phase, updated, latest) for uid, phase, updated, latest, *_ in found}
            begun = {uid: _aware(first) for uid, _, _, _, first, *_ in found if first is not None}
            ready_once = {uid for uid, _, _, _, _, count, *_ in found if count}
            others = {uid for uid, *_, repository, _ in found if not self._mine(repository)}
            # Lives that began in the queue (the lifecycle policy's caps): their first Provisioning left it.
            began_queued = {uid for uid, *_, first_queued in found if first_queued is not None}
            # Objects still listed whose end is recorded (their finalizer was not released yet).
            unknown = sorted(listed - set(rows))
            ended: set[str] = set()
            for start in range(0, len(unknown), 500):
                chunk = unknown[start : start + 500]
                ended.update(
                    (
                        await session.execute(
                            sa_select(col(EnvironmentRow.uid)).where(
                                col(EnvironmentRow.uid).in_(chunk), col(EnvironmentRow.destroyed_at).is_not(None)
                            )
                        )
                    ).scalars()
                )
        # Transitions on their way are written with their own reasons and times: leave those objects to them.
        waiting = [item for item in [self._current, *self._queue] if isinstance(item, Transition)]
        queued = {t.uid for t in waiting}
        coming = {(t.uid, t.phase) for t in waiting}
        ending = {t.uid for t in waiting if t.phase is DESTROYED}
        written = 0
        for obj in job.objects:
            meta, status = obj["metadata"], obj.get("status") or {}
            uid = meta["uid"]
            # When its phase began: status.lastTransitionTime (the Ready condition's own time changes only
            # with its status, so a Failed after a Provisioning keeps the earlier one).
            conditions = status.get("conditions") or [{}]
            at_text = status.get("lastTransitionTime") or conditions[0].get("lastTransitionTime")
            if uid in ended or not status.get("phase") or not at_text:
                continue
            try:
                phase = parse_phase(str(status["phase"]))
            except ValueError as err:  # the CRD allows none such: a newer operator's, left to it
                log.warning("resync skips %s: %s", meta["name"], err)
                continue
            row = rows.get(uid)
            pending: list[Transition] = []
            provisioned_once = phase in PROVISIONED_PHASES or status.get("provisionedAt") or status.get("namespace")
            provisioning_at = begun.get(uid)
            created = meta.get("creationTimestamp")
            lost_provisioning = (
                provisioning_at is None
                and phase is not Phase.PROVISIONING
                and provisioned_once
                and (uid, Phase.PROVISIONING) not in coming
            )
            if lost_provisioning and uid in began_queued:
                # Its admission died with a killed operator (or its old shard's writer has it still):
                # it left the queue, which the rows hold, when it was provisioned. Its Ready came with
                # it, so its time and id are the first Ready's second (as the handler's own has them),
                # or the current phase's; never before the queue it left.
                admitted_at = status.get("provisionedAt") or at_text
                occurred = _time(admitted_at) or job.listed_at
                if row is not None and row[2] is not None and _aware(row[2]) >= occurred:
                    occurred = _aware(row[2]) + TICK
                pending.append(_resync_transition(obj, Phase.PROVISIONING, admitted_at, occurred, Phase.QUEUED))
                provisioning_at = pending[-1].occurred
            elif lost_provisioning and created:
                # Its first transitions died with a killed operator: its life began with
                # provisioning when it was created.
                pending.append(_resync_transition(obj, Phase.PROVISIONING, created))
                provisioning_at = pending[-1].occurred
            first_ready = status.get("provisionedAt")  # written with its first Ready
            if uid not in ready_once and phase is not Phase.READY and first_ready and (uid, Phase.READY) not in coming:
                # It was Ready, and moved on before a record of that outlived a killed operator.
                # Kubernetes keeps only seconds: never before the provisioning it followed.
                occurred = _time(first_ready) or job.listed_at
                if provisioning_at is not None and occurred <= provisioning_at:
                    occurred = provisioning_at + TICK
                pending.append(_resync_transition(obj, Phase.READY, first_ready, occurred))
            if uid not in queued and not (row is not None and _up_to_date(row[0], row[2], phase, _time(at_text))):
                # The object's current phase began after every recorded event (the listing is newer
                # than the rows): Kubernetes keeps only seconds, so place it after the last one.
                occurred = _time(at_text) or job.listed_at
                floor = [_aware(row[2])] if row is not None and row[2] is not None else []
                floor += [t.occurred for t in pending]
                if floor and max(floor) >= occurred:
                    occurred = max(floor) + TICK
                pending.append(_resync_transition(obj, phase, at_text, occurred))
            written += await self._write_all(pending)
        gone = [
            uid
            for uid, (_, updated, _) in rows.items()
            if uid not in listed and uid not in ending and uid not in others and _aware(updated) < job.listed_at
        ]
        for uid in gone:
            async with AsyncSession(self.engine) as session:
                row_obj = await session.get(EnvironmentRow, uid)
            if row_obj is None or await self._elsewhere(row_obj):
                continue
            pending = []
            if row_obj.phase != Phase.DESTROYING.value:  # its teardown began before the end was recorded
                began = job.listed_at - datetime.timedelta(milliseconds=1)  # so that it sorts first
                pending.append(_destroyed_transition(row_obj, began, Phase.DESTROYING))
            pending.append(_destroyed_transition(row_obj, job.listed_at, DESTROYED, Phase.DESTROYING))
            written += await self._write_all(pending)
        if written:
            log.info("resync wrote %d missing transition(s)", written)

    def _mine(self, repository: str) -> bool:
        return self.shards == 1 or shard_of(repository, self.shards) == self.shard

    async def _elsewhere(self, row: EnvironmentRow) -> bool:
        """Whether a row's object, missing from this shard's listing, still lives under another label
        (being moved between shards): asked of the API server, so that it is never recorded as gone."""
        if self.shards == 1 or self.kube is None:
            return False
        kube = self.kube
        try:
            obj = await asyncio.to_thread(kube.get_environment, row.name)
        except KubeError as err:  # in doubt it is not gone: the next resync asks again
            log.warning("resync could not look up %s: %s", row.name, err)
            return True
        return obj is not None and obj["metadata"].get("uid") == row.uid

    async def _write_all(self, transitions: list[Transition]) -> int:
        """Write a resync's transitions of one object; one that can never be written is dead-lettered."""
        for t in transitions:
            try:
                await self.write(t)
            except Exception as err:
                if transient(err):
                    raise
                self._dead_letter(t, err)
                return 0
        return len(transitions)

    async def purgeable(self, older_than: datetime.timedelta) -> int:
        """How many destroyed environments `purge` would delete now (a dry run)."""
        cutoff = _now() - older_than
        async with AsyncSession(self.engine) as session:
            query = sa_select(func.count()).select_from(EnvironmentRow).where(col(EnvironmentRow.destroyed_at) < cutoff)
            return int((await session.execute(query)).scalar_one())

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


def _implied(t: Transition, old: TransitionPhase, previous: tuple[str, datetime.datetime] | None) -> Transition:
    """The transition into `old` (`t.old_phase`) that the history lacks: `t` says it happened, before `t`.

    Its time is the status's own when `t` carries the status of that phase (an end carries the
    Destroying status), else just before `t`; never before the event that precedes it."""
    when = t.occurred - TICK
    if t.status.get("phase") == old.value:
        began = _time(t.status.get("lastTransitionTime"))
        if began is not None and began < t.occurred:
            when = began
    if previous is not None and when <= previous[1]:
        when = previous[1] + TICK
    return Transition(
        name=t.name,
        uid=t.uid,
        generation=t.generation,
        spec=t.spec,
        old_phase=parse_phase(previous[0]) if previous else None,
        phase=old,
        reason=INFERRED,
        message=f"Its own record was lost; {t.phase} came from it",
        at=_stamp(when),
        status=t.status,
        created=t.created,
        occurred=when,
    )


def _resync_transition(
    obj: dict[str, Any],
    phase: TransitionPhase,
    at: str,
    occurred: datetime.datetime | None = None,
    old_phase: Phase | None = None,
) -> Transition:
    meta, status = obj["metadata"], obj.get("status") or {}
    return Transition(
        name=meta["name"],
        uid=meta["uid"],
        # The generation that reached the phase, as the handler's own transition has it (`event_id`).
        generation=int(status.get("observedGeneration") or meta.get("generation", 1)),
        spec=dict(obj.get("spec") or {}),
        old_phase=old_phase,
        phase=phase,
        reason=RESYNC,
        message=str(status.get("message") or ""),
        at=at,
        status=dict(status),
        created=meta.get("creationTimestamp"),
        occurred=occurred or _time(at) or _now(),
    )


def _destroyed_transition(
    row: EnvironmentRow, at: datetime.datetime, phase: TransitionPhase, old_phase: TransitionPhase | None = None
) -> Transition:
    return Transition(
        name=row.name,
        uid=row.uid,
        generation=0,
        spec={"repository": row.repository, "pullRequest": row.pull_request, "commitSha": row.commit_sha},
        old_phase=old_phase or parse_phase(row.phase),
        phase=phase,
        reason=RESYNC,
        message="The object is gone from the cluster",
        at=_stamp(at),
        status={"namespace": row.namespace},
        occurred=at,
    )
