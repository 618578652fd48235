"""On-demand runs of the operator's periodic jobs: `ephemera jobs run sweep|purge|retry-failed`.

The command never runs a job itself: it asks the active operator replica, which holds the job's lock
(so the run never overlaps the operator's own periodic run of it, nor another request's), and which
already has what the job reads (the watch's view of every object, the records writer). The request is
an annotation on the ConfigMap `ephemera-jobs` in the release's namespace,
`jobs.ephemera.dev/<id>: {"job": ..., "dryRun": ..., "olderThan": ..., "maxAge": ...}`; the operator
watches that one ConfigMap, runs the job, and answers in one patch: the report in `data[<id>]` (JSON)
and the request's annotation removed. The command waits for the report, prints it and removes it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ephemera.api.models import now_iso, parse_time
from ephemera.kube import Kube, KubeError, Obj

log = logging.getLogger(__name__)

CONFIG_MAP = "ephemera-jobs"
REQUEST_PREFIX = "jobs.ephemera.dev/"
JOBS = ("sweep", "purge", "retry-failed")
# Reports nobody collected (the command was stopped) are removed after this long.
REPORT_RETENTION = 3600.0
# Seconds each watch of the ConfigMap lasts before it is made again (and lists the ConfigMap again:
# a request that arrived while this replica was a standby is seen once it is the active one).
WATCH_SECONDS = 30
MAX_ANSWERED = 10_000
_ID = re.compile(r"^[a-z0-9]{1,40}$")


@dataclass(frozen=True)
class JobRequest:
    id: str
    job: str
    dry_run: bool = False
    older_than: float | None = None  # purge: records destroyed longer ago than this (seconds)
    max_age: float | None = None  # retry-failed: failures younger than this (seconds)
    requested_at: str = ""

    @classmethod
    def new(
        cls, job: str, *, dry_run: bool, older_than: float | None = None, max_age: float | None = None
    ) -> JobRequest:
        if job not in JOBS:
            raise ValueError(f"unknown job {job!r}: one of {', '.join(JOBS)}")
        return cls(uuid.uuid4().hex[:16], job, dry_run, older_than, max_age, now_iso())

    @property
    def key(self) -> str:
        return REQUEST_PREFIX + self.id

    def to_json(self) -> str:
        return json.dumps(
            {
                "job": self.job,
                "dryRun": self.dry_run,
                "olderThan": self.older_than,
                "maxAge": self.max_age,
                "requestedAt": self.requested_at,
            }
        )

    @classmethod
    def parse(cls, key: str, value: str) -> JobRequest:
        """A request from its annotation; ValueError says what is wrong with it."""
        request_id = key.removeprefix(REQUEST_PREFIX)
        if not _ID.match(request_id):
            raise ValueError(f"{key}: the id after {REQUEST_PREFIX} must be 1-40 of [a-z0-9]")
        data = json.loads(value)
        if not isinstance(data, dict) or data.get("job") not in JOBS:
            raise ValueError(f"{key}: job must be one of {', '.join(JOBS)}")
        numbers = {}
        for field in ("olderThan", "maxAge"):
            number = data.get(field)
            if number is not None and (not isinstance(number, int | float) or isinstance(number, bool) or number <= 0):
                raise ValueError(f"{key}: {field} must be a positive number of seconds")
            numbers[field] = None if number is None else float(number)
        return cls(
            request_id,
            str(data["job"]),
            bool(data.get("dryRun")),
            numbers["olderThan"],
            numbers["maxAge"],
            str(data.get("requestedAt") or ""),
        )


def pending(config_map: Obj) -> tuple[list[JobRequest], dict[str, str]]:
    """The requests on the ConfigMap that have no report yet, and the malformed ones (id -> why)."""
    annotations = (config_map.get("metadata") or {}).get("annotations") or {}
    reports = config_map.get("data") or {}
    found, bad = [], {}
    for key, value in sorted(annotations.items()):
        if not key.startswith(REQUEST_PREFIX) or key.removeprefix(REQUEST_PREFIX) in reports:
            continue
        try:
            found.append(JobRequest.parse(key, value))
        except ValueError as err:  # json's errors are ValueErrors too
            bad[key.removeprefix(REQUEST_PREFIX)[:40]] = str(err)
    return found, bad


# The command's side --------------------------------------------------------------------------------


def submit(kube: Kube, namespace: str, *requests: JobRequest) -> None:
    """Put the requests on the ConfigMap (made if it is not there yet), in one write."""
    if kube.get_config_map(namespace, CONFIG_MAP) is None:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": CONFIG_MAP,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "ephemera", "app.kubernetes.io/component": "jobs"},
            },
        }
        try:
            kube.create_config_map(body)
        except KubeError as err:
            if err.status != 409:  # made by another request meanwhile: fine
                raise
    annotations = {request.key: request.to_json() for request in requests}
    kube.patch_config_map(namespace, CONFIG_MAP, {"metadata": {"annotations": annotations}})


def wait_report(
    kube: Kube, namespace: str, request: JobRequest, timeout: float, poll: float = 0.5
) -> dict[str, Any] | None:
    """The report of `request` once the operator wrote it (then removed from the ConfigMap); None after
    `timeout` seconds (the request is withdrawn then, so that it does not run later unseen)."""
    deadline = time.monotonic() + timeout
    while True:
        config_map = kube.get_config_map(namespace, CONFIG_MAP) or {}
        text = (config_map.get("data") or {}).get(request.id)
        if text is not None:
            kube.patch_config_map(namespace, CONFIG_MAP, {"data": {request.id: None}})
            report: dict[str, Any] = json.loads(text)
            return report
        if time.monotonic() >= deadline:
            kube.patch_config_map(namespace, CONFIG_MAP, {"metadata": {"annotations": {request.key: None}}})
            return None
        time.sleep(poll)  # the command's own wait for the operator's answer, not a test's


# The operator's side -------------------------------------------------------------------------------


def _now() -> str:
    """RFC 3339 UTC to the microsecond: two runs of a job are told apart even within one second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


Run = Callable[[JobRequest], Awaitable[dict[str, Any]]]


class JobRequests:
    """Watch the ConfigMap and run each new request once, on the active replica, reporting on it."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        run: Run,
        *,
        locks: dict[str, asyncio.Lock],
        active: Callable[[], Awaitable[bool]],
        identity: str,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.run = run
        self.locks = locks  # one per job, also held by the job's periodic run
        self.active = active
        self.identity = identity
        self._handling: set[str] = set()  # ids of requests under way here
        # Ids answered here: an event older than the answer (still showing the request) must not run it again.
        self._answered: set[str] = set()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Watch until cancelled (a task of the operator's periodic jobs)."""
        self._loop = asyncio.get_running_loop()
        watcher = threading.Thread(target=self._watch, name="job-requests", daemon=True)
        watcher.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()
            for task in list(self._tasks):
                task.cancel()

    def _watch(self) -> None:
        """In a thread of its own: the watch blocks. Each event goes to the loop."""
        while not self._stop.is_set():
            try:
                for kind, obj in self.kube.watch_config_map(self.namespace, CONFIG_MAP, WATCH_SECONDS):
                    if self._stop.is_set():
                        return
                    if kind in ("ADDED", "MODIFIED") and self._loop is not None:
                        self._loop.call_soon_threadsafe(self._seen, obj)
            except KubeError as err:
                # A refusal (RBAC) will not pass by itself: said less often than an outage.
                log.warning("watching ConfigMap %s/%s for job requests: %s", self.namespace, CONFIG_MAP, err)
                self._stop.wait(5.0 if err.temporary else 60.0)

    def _seen(self, config_map: Obj) -> None:
        requests, bad = pending(config_map)
        for request in requests:
            if request.id not in self._handling and request.id not in self._answered:
                self._handling.add(request.id)
                task = asyncio.create_task(self._handle(request), name=f"job request {request.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        for request_id, why in bad.items():
            if request_id not in self._handling and request_id not in self._answered:
                self._handling.add(request_id)
                self._tasks.add(asyncio.create_task(self._refuse(request_id, why)))

    async def _refuse(self, request_id: str, why: str) -> None:
        try:
            if await self.active():
                await self._answer(request_id, {"id": request_id, "ok": False, "error": why})
        finally:
            self._handling.discard(request_id)

    async def _handle(self, request: JobRequest) -> None:
        try:
            if not await self.active():
                return  # the active replica answers it; this one sees it again if it becomes active
            log.info("job %s requested (%s%s)", request.job, request.id, ", dry run" if request.dry_run else "")
            report: dict[str, Any] = {
                "id": request.id,
                "job": request.job,
                "dryRun": request.dry_run,
                "replica": self.identity,
            }
            async with self.locks[request.job]:  # after any run of the same job, periodic or requested
                report["startedAt"] = _now()
                try:
                    report["result"] = await self.run(request)
                    report["ok"] = True
                except Exception as err:  # the report says what went wrong; the operator goes on
                    log.exception("job %s (%s) failed", request.job, request.id)
                    report.update(ok=False, error=str(err) or type(err).__name__)
                report["finishedAt"] = _now()
            await self._answer(request.id, report)
        finally:
            self._handling.discard(request.id)

    async def _answer(self, request_id: str, report: dict[str, Any]) -> None:
        """The report in, the request out, and reports nobody collected pruned: one merge patch."""
        config_map = await asyncio.to_thread(self.kube.get_config_map, self.namespace, CONFIG_MAP) or {}
        data: dict[str, str | None] = {request_id: json.dumps(report)}
        now = datetime.datetime.now(datetime.UTC)
        for old_id, text in (config_map.get("data") or {}).items():
            try:
                finished = parse_time(json.loads(text).get("finishedAt"))
            except (ValueError, AttributeError):
                finished = None
            if finished is not None and (now - finished).total_seconds() > REPORT_RETENTION:
                data[old_id] = None
        patch = {"metadata": {"annotations": {REQUEST_PREFIX + request_id: None}}, "data": data}
        try:
            await asyncio.to_thread(self.kube.patch_config_map, self.namespace, CONFIG_MAP, patch)
            if len(self._answered) > MAX_ANSWERED:
                self._answered.clear()  # old ids: their requests are long gone from the ConfigMap
            self._answered.add(request_id)
        except KubeError as err:
            log.error("the report of job request %s could not be written: %s", request_id, err)
