"""Operator start-up and clean-up: kopf settings, and the Runtime every handler shares (`memo.runtime`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import kopf
import kubernetes

from ephemera import children, logs
from ephemera.admission import Admission
from ephemera.api.naming import FINALIZER, MANAGED_BY, MANAGED_BY_LABEL
from ephemera.apply import Applier
from ephemera.config import Settings, get_settings
from ephemera.environments import Environments
from ephemera.expiry import Expiry, Lifetimes
from ephemera.github.client import GitHubAuth
from ephemera.github.outbox import Reporter
from ephemera.hooks import Hooks
from ephemera.kube import PAGE_SIZE, Kube, KubeError, load_api_client
from ephemera.ledger import Ledger
from ephemera.operator import apps, health, jobs, persistence
from ephemera.operator.metrics import observe_transition
from ephemera.operator.runtime import Runtime
from ephemera.previews import Previews
from ephemera.store.engine import SchemaOutdated, check_schema, make_engine
from ephemera.store.records import Records
from ephemera.templates import TemplateError, select
from ephemera.transitions import Transition, Transitions
from ephemera.watchcache import Seen, Vanishing

PREFIX = "ephemera.dev"
WORKER_IDLE_TIMEOUT = 0.5  # seconds a kopf worker keeps its slot after its object's last event: see _tune


@kopf.on.startup()
async def configure(*, settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    cfg = get_settings()
    _tune(settings, cfg)
    identity = _identity(memo, cfg)
    memo.runtime = await _start(cfg, settings.peering.priority, identity, logger)
    logger.info("Operator started; health and metrics on %s:%d", cfg.operator_host, cfg.operator_port)


def _tune(settings: kopf.OperatorSettings, cfg: Settings) -> None:
    """kopf's own settings: where it keeps progress, how many threads, which Events, timeouts, peering."""
    # The last handled spec lives in status.kopf (the CRD keeps that field's content), progress in
    # annotations: kopf's patch after a handler done at once, with the status it sets, is one write.
    settings.persistence.progress_storage = persistence.ProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = persistence.DiffBaseStorage(prefix=PREFIX)
    settings.persistence.finalizer = FINALIZER
    # After its own patch kopf waits for the watch to bring that version back before acting on older
    # events; past this wait it acts on them as if current. Under a burst the watch runs seconds
    # behind, and at kopf's 5 s an event from before the patch (then our own Ready write; now Ready
    # rides in kopf's patch) looked like a new object: 77% of a burst of 1,000 were provisioned twice.
    settings.persistence.consistency_timeout = cfg.watch_consistency_timeout
    # Handlers run in a pool of `workers` threads. kopf's per-object workers (one per object with
    # events) are limited: every object in flight touches ~50 KB that the process keeps, so 20,000
    # created at once passed 1 GB unlimited. An object waiting for a slot holds only the raw events
    # that came for it meanwhile and an unstarted coroutine. Too low a limit slows bursts (50: a burst
    # of 500 took 12x longer); bench/RESULTS.md, session 6, has the measured default.
    settings.execution.max_workers = cfg.workers
    settings.queueing.worker_limit = cfg.worker_limit or None
    # A worker holds its slot until it has idled this long after its object's last event (kopf: 5 s),
    # or longer while it waits for its own patch to come back (the consistency timeout above). At 5 s
    # the slots, not the handlers, set the pace once they are all taken: a limit of L passes at most
    # L/5 objects a second, and a restart resumes every existing object through them (an operator
    # limited to 2 took 5 s per 2 objects). A new event after the worker left starts another.
    settings.queueing.idle_timeout = WORKER_IDLE_TIMEOUT
    # Events: ours are posted explicitly, with their own reasons (our log lines are not posted again,
    # see reconciling.env_logger); of kopf's own lines only warnings and errors, not "Handler succeeded".
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # A restart's first listing in pages, as our own listings are: one response with 20,000 objects
    # would be some 200 MB parsed at once, which the process then keeps as its resident size.
    settings.watching.chunk_size = PAGE_SIZE
    # kopf filters handlers' labels on its side: without these the API server would send, and kopf
    # keep a record of (about 1 KB each, for as long as the object lives), every namespace and pod of
    # the cluster. The selectors equal the handlers' own filters, so no handler misses an event.
    settings.watching.label_selectors["v1", "namespaces"] = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
    for resource in apps.WORKLOADS:
        settings.watching.label_selectors[resource] = apps.WORKLOAD_SELECTOR
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.peering.lifetime = cfg.peering_lifetime
    settings.peering.mandatory = cfg.peering is not None
    # Our own /healthz serves liveness; kopf's probes need nothing else.


async def _start(cfg: Settings, priority: int, identity: str, logger: kopf.Logger) -> Runtime:
    """Make the clients and start the background work, consumers of transitions before their producers.
    A start that fails half-way closes what it opened (kopf retries it)."""
    async with contextlib.AsyncExitStack() as undo:
        kube = Kube(await asyncio.to_thread(load_api_client, cfg.kubeconfig, cfg.workers + 10))
        undo.callback(kube.close)
        transitions = Transitions()
        transitions.subscribe(observe_transition)
        templates = apps.Templates()
        await asyncio.to_thread(templates.prime, kube)  # before any environment is provisioned
        environments = Environments(
            kube, cfg, transitions, recorder=event_poster(kube), previews=_previews(cfg, kube, templates)
        )
        # The lifecycle policy's ledger, from one listing before kopf watches anything: the first
        # admission counts every live environment.
        ledger = Ledger(shard=str(cfg.shard) if cfg.shards > 1 else None)
        await asyncio.to_thread(lambda: ledger.prime(kube.list_environments()))
        lifetimes = Lifetimes(cfg, templates.bodies)
        records = await _records(cfg, kube, logger)
        undo.push_async_callback(records.stop)
        transitions.subscribe(records.listener)
        auth = await asyncio.to_thread(GitHubAuth, cfg)
        if not auth.configured:
            logger.info("GitHub reporting is off: no GitHub App and no token configured")
        reporter = Reporter(cfg, kube, auth)
        reporter.start()
        undo.push_async_callback(reporter.stop)
        transitions.subscribe(reporter.listener)
        hooks = Hooks(cfg, _hook_targets(cfg, templates))
        hooks.start()
        undo.push_async_callback(hooks.stop)
        transitions.subscribe(hooks.listener)
        subjects = logs.Subjects()
        logs.attach(logs.SubjectFilter(subjects))
        settler = apps.Settler(environments)
        settler.start()
        undo.push_async_callback(settler.stop)
        phases: dict[str, Seen] = {}  # kept by lifecycle.track
        rollouts = apps.Rollouts(
            environments,
            templates,
            phases,
            rate=cfg.template_rollout_rate,
            active=_active(kube, cfg, priority, identity),
        )
        rollouts.start()
        undo.push_async_callback(rollouts.stop)
        runtime = Runtime(
            settings=cfg,
            environments=environments,
            templates=templates,
            settler=settler,
            rollouts=rollouts,
            reporter=reporter,
            hooks=hooks,
            phases=phases,
            vanishing=Vanishing(),
            warned=set(),
            ledger=ledger,
            admission=Admission(environments, ledger, lifetimes),
            expiry=Expiry(environments, ledger, lifetimes),
            subjects=subjects,
            kube=kube,
            records=records,
            health=await health.start(cfg.operator_host, cfg.operator_port),
        )
        runtime.periodic.extend(jobs.start(runtime, priority, identity))
        undo.pop_all()
    return runtime


def _previews(cfg: Settings, kube: Kube, templates: apps.Templates) -> Previews:
    """Templates applied with the operator's own rights, never outside the preview namespace, and never
    over Ephemera's own guards."""
    reserved = [
        ("ResourceQuota", children.QUOTA_NAME),
        ("LimitRange", children.LIMIT_RANGE_NAME),
        ("NetworkPolicy", children.NETWORK_POLICY_NAME),
        ("NetworkPolicy", children.EGRESS_POLICY_NAME),
    ]
    applier = Applier(kube, deny=cfg.template_deny, reserved=reserved)
    found = shutil.which("helm")
    helm = cfg.helm_binary or (Path(found) if found else None)
    return Previews(kube, applier, domain=cfg.preview_domain, helm=helm, templates=templates)


def _hook_targets(cfg: Settings, templates: apps.Templates) -> Callable[[Transition], list[str]]:
    """A transition's hook targets: EPHEMERA_HOOK_URLS, then those of the PreviewTemplate its repository
    selects now (none when the choice is ambiguous: that environment is Failed for it anyway)."""

    def targets(transition: Transition) -> list[str]:
        urls = list(cfg.hook_urls)
        repository = str(transition.spec.get("repository") or "")
        try:
            template = select(templates(), repository)
        except TemplateError:
            template = None
        if template is not None:
            urls += [hook.url for hook in template.spec.hooks if hook.url not in urls]
        return urls

    return targets


def _active(kube: Kube, cfg: Settings, priority: int, identity: str) -> Callable[[], Awaitable[bool]] | None:
    """Whether this replica is the active one (None standalone, where it always is)."""
    if cfg.peering is None:
        return None

    async def active() -> bool:
        try:
            return await asyncio.to_thread(jobs.is_active, kube, cfg.peering, priority, identity)
        except KubeError:
            return False

    return active


def _identity(memo: kopf.Memo, cfg: Settings) -> str:
    """This replica's name in kopf's peering object: `ephemera operator` chooses it and passes it in
    the memo; under `kopf run` it is POD_ID, which kopf takes as its identity when set."""
    identity = memo.get("identity") or os.environ.get("POD_ID")
    if identity is None and cfg.peering is not None:
        raise kopf.PermanentError(
            "EPHEMERA_PEERING is set but this replica cannot find its own peering entry: run `ephemera operator`, "
            "or set POD_ID (kopf's identity) when running `kopf run`"
        )
    return str(identity or "standalone")


async def _records(cfg: Settings, kube: Kube, logger: kopf.Logger) -> Records:
    """The records writer; refuses to start on an out-of-date schema, tolerates an unreachable database."""
    engine = make_engine(cfg.database_url)
    try:
        await check_schema(engine)
    except SchemaOutdated as err:
        logger.error("%s", err)
        await engine.dispose()
        raise kopf.PermanentError(str(err)) from err
    except Exception as err:  # unreachable now: the writer retries, the cluster never waits for it
        logger.warning("records database unreachable at start (%s); records will catch up", err)
    records = Records(
        engine,
        kube,
        queue_limit=cfg.record_queue_limit,
        drain_timeout=cfg.record_drain_timeout,
        shards=cfg.shards,
        shard=cfg.shard,
    )
    records.start()
    return records


def event_poster(kube: Kube) -> Callable[[dict[str, Any], str, str, str], None]:
    """Post Events through kopf's background poster from its handlers, directly from anywhere else."""

    def post(ref: dict[str, Any], type_: str, reason: str, message: str) -> None:
        raw = cast(kopf.RawBody, ref)  # an object reference has all of a body that Events read
        try:
            kopf.event(kopf.Body(raw), type=type_, reason=reason, message=message[:1024])
        except LookupError:  # not in a kopf handler's context (the periodic sweeps): post it ourselves
            try:
                kube.create_event(ref, type_, reason, message[:1024], component="ephemera-operator")
            except KubeError as err:
                logging.getLogger(__name__).warning("could not post an Event: %s", err)

    return post


@kopf.on.login(id="login")
def login(*, logger: kopf.Logger, settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own connection: EPHEMERA_KUBECONFIG when it is set, as for the operator's client (kopf
    alone would read only KUBECONFIG, so the two could talk to different clusters); else kopf's
    usual in-cluster config, then the default kubeconfig."""
    path = get_settings().kubeconfig
    if path is None:
        return kopf.login_via_client(logger=logger, settings=settings, **kwargs)
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(path), client_configuration=configuration)
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        trust_env=settings.networking.trust_env,
    )


@kopf.on.cleanup()
async def cleanup(*, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.runtime  # kopf runs cleanup only after a successful startup
    await runtime.close()
