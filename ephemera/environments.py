"""The lifecycle of one preview environment: provision, update, destroy, fail.

This is the service behind the operator's handlers. It talks to the cluster through `Kube`, writes
the object's status, and announces every phase transition on `Transitions`.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from ephemera import children
from ephemera.api.models import (
    API_VERSION,
    DESTROYED,
    KIND,
    Phase,
    PreviewEnvironmentSpec,
    PreviewEnvironmentStatus,
    TransitionPhase,
    now_iso,
    parse_time,
    ready_condition,
)
from ephemera.api.naming import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    OWNER_UID_ANNOTATION,
    environment_labels,
    environment_names,
)
from ephemera.api.quantity import parse_quantity
from ephemera.apply import Ref
from ephemera.config import Settings
from ephemera.kube import Kube, KubeError, Obj
from ephemera.previews import Previews, Rollout
from ephemera.readiness import Assessment
from ephemera.templates import TemplateError
from ephemera.transitions import Transition, Transitions

# Not a phase of the object (it is gone by then): the last transition the records and GitHub see.
# The reason of a Provisioning or Updating status whose app is applied and not yet ready.
ROLLING_OUT = "RollingOut"


# status.problems holds at most this many objects, each message cut to this many characters (the CRD's
# limits): enough for the PR's check run and comment to name what failed, small enough for the object.
PROBLEMS_MAX = 10
PROBLEM_MESSAGE_MAX = 1024


def _rollout_failed(verdict: Assessment) -> str:
    cause = verdict.summary().rstrip(".")
    return f"The app cannot become ready: {cause}. Fix the PreviewTemplate (or the image), then retry."


def _problems(verdict: Assessment) -> list[dict[str, str]]:
    """The verdict's problems as status.problems: structured, so that GitHub reports (check run,
    comment) list them without parsing the message."""
    return [
        {"kind": p.kind, "name": p.name, "reason": p.reason, "message": p.message[:PROBLEM_MESSAGE_MAX]}
        for p in verdict.problems[:PROBLEMS_MAX]
    ]


class Failure(Exception):
    """Why an environment could not reach its goal; `permanent` ones need a change to pass."""

    permanent = False

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        delay: float = 1.0,
        backoff: bool = True,
        status: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.delay = delay
        self.backoff = backoff  # False for plain waiting, which polls at `delay`
        self.status = status or {}  # what the attempt did that the status must keep (an app's inventory)


class PermanentFailure(Failure):
    permanent = True


class TemporaryFailure(Failure):
    permanent = False


@dataclass(frozen=True)
class Environment:
    """A PreviewEnvironment object, validated."""

    name: str
    uid: str
    generation: int
    spec: PreviewEnvironmentSpec
    status: PreviewEnvironmentStatus
    annotations: dict[str, str]
    created: str | None = None

    @classmethod
    def from_body(cls, body: Obj) -> Environment:
        meta = body.get("metadata", {})
        try:
            spec = PreviewEnvironmentSpec.model_validate(dict(body.get("spec") or {}))
        except ValidationError as err:
            problems = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            raise PermanentFailure("InvalidSpec", f"The spec cannot work: {problems}. Fix the object.") from err
        return cls(
            name=meta["name"],
            uid=meta["uid"],
            generation=int(meta.get("generation", 1)),
            spec=spec,
            status=PreviewEnvironmentStatus.model_validate(dict(body.get("status") or {})),
            annotations=dict(meta.get("annotations") or {}),
            created=meta.get("creationTimestamp"),
        )

    def announcement(
        self,
        *,
        old_phase: TransitionPhase | None,
        phase: TransitionPhase,
        reason: str,
        message: str,
        at: str,
        status: dict[str, Any],
        resumed: bool = False,
    ) -> Transition:
        """The Transition that tells the listeners this object reached `phase`."""
        return Transition(
            name=self.name,
            uid=self.uid,
            generation=self.generation,
            spec=self.spec.to_k8s(),
            old_phase=old_phase,
            phase=phase,
            reason=reason,
            message=message,
            at=at,
            status=status,
            created=self.created,
            annotations=self.annotations,
            resumed=resumed,
        )

    def ref(self) -> dict[str, Any]:
        """A reference to the object, for Events."""
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": self.name, "uid": self.uid}}

    def namespace(self, prefix: str) -> str:
        """The namespace the environment uses: the one its status names when that is one of its PR's
        names (an environment made before the hash grew keeps its 8-hex one), else the current name."""
        names = environment_names(self.spec.repository, self.spec.pull_request, prefix)
        return self.status.namespace if self.status.namespace in names else names[0]

    def namespaces(self, prefix: str) -> list[str]:
        """Every namespace a teardown looks for: the one in use, and the PR's other names (an
        environment whose first provision stopped before its status named the namespace may hold
        one under the legacy name). Each is deleted only if it is this object's own."""
        found = [self.status.namespace] if self.status.namespace else []
        found += environment_names(self.spec.repository, self.spec.pull_request, prefix)
        return list(dict.fromkeys(found))


def _same(desired: Any, actual: Any) -> bool:
    """Whether `actual` (as the API server returns it) matches `desired`, quantities by value."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(_same(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(desired) == len(actual)
            and all(_same(d, a) for d, a in zip(desired, actual, strict=True))
        )
    if isinstance(desired, str) and isinstance(actual, str) and desired != actual:
        try:
            return parse_quantity(desired) == parse_quantity(actual)
        except ValueError:
            return False
    return bool(desired == actual)


# A status patch being built: what kopf sends with its own record once a handler returns.
Status = MutableMapping[str, Any]


@dataclass(frozen=True)
class Step:
    """A transition decided now and written later, with the one after it when that follows at once:
    the Provisioning (or Updating) before a Ready. Announced with the time it was decided."""

    phase: Phase
    reason: str
    message: str
    extra: dict[str, Any] | None = None
    at: str = field(default_factory=now_iso)
    occurred: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))


@dataclass(frozen=True)
class Converged:
    """What a provision made: the namespace, notes on what was mended, the status fields for Ready;
    `rolling_out` says what the app still waits for, if it is not ready yet."""

    namespace: str
    notes: list[str]
    extra: dict[str, Any]
    rolling_out: str | None = None


@dataclass(frozen=True)
class Terminating:
    """The namespaces (name and uid) deleted by a teardown and not gone yet."""

    env: Environment
    namespaces: tuple[tuple[str, str], ...]

    @property
    def names(self) -> str:
        return ", ".join(name for name, _ in self.namespaces)


# Posts a Kubernetes Event about an object: (object reference, type, reason, message).
Recorder = Callable[[dict[str, Any], str, str, str], None]


def _no_events(ref: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """The recorder when none is given: Events are the operator's to post."""


class Environments:
    """Provision, mend and destroy environments; every transition is written, announced and posted as an Event."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        transitions: Transitions,
        recorder: Recorder = _no_events,
        previews: Previews | None = None,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.transitions = transitions
        self.recorder = recorder
        self.previews = previews  # the application in each preview (PreviewTemplates); None: namespaces only

    # Status ---------------------------------------------------------------------------------------

    def transition(
        self,
        env: Environment,
        phase: Phase,
        reason: str,
        message: str,
        extra: dict[str, Any] | None = None,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        *,
        into: Status | None = None,
        at: str | None = None,
    ) -> Environment:
        """Write the new phase to the object's status, announce it, and return the updated object.

        `into`: the status of the patch a kopf handler's framework sends once the handler returns (with
        its own record of the object: one write for both); the caller must return right after. `at`:
        when the phase began, if the caller wrote that time elsewhere too (else now)."""
        at = at or now_iso()
        status = self._status(env, phase, reason, message, at, extra)
        if into is not None:
            into.update(status)
        elif self.kube.patch_environment_status(env.name, status) is None:
            return env  # the object is gone; nothing to announce
        return self._announce(env, phase, reason, message, at, status, logger)

    def _status(
        self, env: Environment, phase: Phase, reason: str, message: str, at: str, extra: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The status patch that takes `env` to `phase` at `at`."""
        ready = ready_condition(
            phase, reason, message, generation=env.generation, at=at, previous=env.status.conditions
        )
        status: dict[str, Any] = {
            "phase": phase.value,
            "reason": reason,
            "message": message,
            "observedGeneration": env.generation,
            "conditions": [ready.model_dump(by_alias=True, exclude_none=True)],
        }
        if env.status.phase != phase:
            status["lastTransitionTime"] = at
        if phase is not Phase.FAILED and env.status.problems:
            status["problems"] = None  # they were about a failure this transition leaves behind
        status.update(extra or {})
        return status

    def _announce(
        self,
        env: Environment,
        phase: Phase,
        reason: str,
        message: str,
        at: str,
        status: dict[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any] | None,
        occurred: datetime.datetime | None = None,
    ) -> Environment:
        """Log, post and publish the transition whose status patch is `status`; `env` after it."""
        if logger is not None:
            level = logging.WARNING if phase is Phase.FAILED else logging.INFO
            logger.log(level, "%s: %s", phase.value, message)
        # A new object's first step, and its wait in the queue: its Ready (or Failed) says enough, and a
        # burst of PRs posts no Event each for them.
        if phase not in (Phase.PROVISIONING, Phase.QUEUED):
            self.recorder(env.ref(), "Warning" if phase is Phase.FAILED else "Normal", reason, message)
        merged = {**env.status.model_dump(by_alias=True, exclude_none=True), **status}
        announced = env.announcement(
            old_phase=env.status.phase, phase=phase, reason=reason, message=message, at=at, status=merged
        )
        if occurred is not None:
            announced = replace(announced, occurred=occurred)
        self.transitions.publish(announced)
        return replace(env, status=PreviewEnvironmentStatus.model_validate(merged))

    def fail(
        self,
        env: Environment,
        failure: Failure,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> Environment:
        return self.transition(
            env,
            Phase.FAILED,
            failure.reason,
            failure.message,
            # An earlier failure's problems never stay on one that has none of its own.
            {"problems": None, **failure.status, "failedAt": now_iso(), "permanent": failure.permanent},
            logger,
        )

    def refuse(self, name: str, failure: PermanentFailure) -> None:
        """Say on an object whose spec cannot be read (one the API server let through) why it cannot
        work: Failed for good, until the spec changes. Nothing is announced: there is no environment."""
        status = {"phase": Phase.FAILED.value, "reason": failure.reason, "message": failure.message, "permanent": True}
        self.kube.patch_environment_status(name, status)

    # Ownership ------------------------------------------------------------------------------------

    def owns(self, env: Environment, namespace: Obj) -> bool:
        """Ours only with both Ephemera's label and this object's uid as the ownership mark."""
        meta = namespace.get("metadata", {})
        labelled = (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
        marked = (meta.get("annotations") or {}).get(OWNER_UID_ANNOTATION) == env.uid
        foreign_owner = any(ref.get("uid") != env.uid for ref in meta.get("ownerReferences") or [])
        return labelled and marked and not foreign_owner

    # Lifecycle ------------------------------------------------------------------------------------

    def provision(
        self,
        env: Environment,
        *,
        updating: bool,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        first: dict[str, Any] | None = None,
        into: Status | None = None,
    ) -> None:
        """Bring the environment to Ready: create what is missing and mend what drifted. `first` goes
        into the status with the first transition (the lifecycle policy's times).

        `into` (see `transition`): Ready goes there, and the Provisioning (or Updating) step before it
        is written only if the environment does not get to Ready at once (a wait, a rollout, a
        failure); when it does, the step is announced with Ready and its fields ride in the same write."""
        phase = Phase.UPDATING if updating else Phase.PROVISIONING
        step: Step | None = None
        if env.status.phase != phase or env.status.observed_generation != env.generation:
            step = Step(phase, phase.value, f"{phase.value} for commit {env.spec.commit_sha[:7]}", first)
            if into is None:
                env, step = self._enter(env, step), None
        # Provisioning mends quietly what its own earlier attempt left (`_ensure`), written or not.
        working = env if step is None else replace(env, status=env.status.model_copy(update={"phase": phase}))
        try:
            done = self._converge(working, logger)
        except BaseException:
            if step is not None:  # the status says where the environment is while kopf retries or fails it
                self._enter(env, step)
            raise
        if done.rolling_out is not None:
            if step is not None:
                env = self._enter(env, step)
            self.transition(env, phase, ROLLING_OUT, f"Rolling out: {done.rolling_out}", done.extra, logger)
            return  # the app watch (operator/apps.py) settles it
        self._ready(env, done.namespace, done.notes, done.extra, logger, step=step, into=into)

    def _enter(self, env: Environment, step: Step) -> Environment:
        """Write and announce `step` now (not logged: the step's outcome is)."""
        return self.transition(env, step.phase, step.reason, step.message, step.extra)

    def _converge(self, env: Environment, logger: logging.Logger | logging.LoggerAdapter[Any]) -> Converged:
        """Create or mend the namespace, its children and the app; nothing is written to the object."""
        try:
            quota = children.resolve_quota(env.spec, self.settings)
        except children.QuotaError as err:
            raise PermanentFailure("QuotaAboveCeiling", str(err)) from err
        namespace = env.namespace(self.settings.namespace_prefix)
        try:
            notes = self._ensure(env, namespace, quota, logger)
        except KubeError as err:
            if err.temporary:
                raise TemporaryFailure("KubernetesError", f"{err}; retrying") from err
            raise PermanentFailure(
                "KubernetesError", f"{err}. Check the operator's RBAC and the object's spec."
            ) from err
        extra: dict[str, Any] = {"namespace": namespace, "commit": env.spec.commit_sha[:7]}
        if self.settings.environment_url:
            extra["url"] = self.settings.environment_url.format(namespace=namespace, name=env.name)
        rollout = self._roll_out(env, namespace)
        if rollout is not None:
            extra.update(rollout.status())
            verdict = self._assess(namespace, rollout.inventory, rollout.workloads)
            if verdict.failed:
                extra["problems"] = _problems(verdict)
                raise PermanentFailure("RolloutFailed", _rollout_failed(verdict), status=extra)
            if not verdict.ready:
                timeout = rollout.timeout or self.settings.hard_time_limit
                deadline = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=timeout)
                extra["rolloutDeadline"] = deadline.replace(microsecond=0).isoformat().replace("+00:00", "Z")
                return Converged(namespace, notes, extra, rolling_out=verdict.summary())
            notes.append(f"app from template {rollout.template} ready")
        elif env.status.inventory:
            extra.update({"template": None, "inventory": None})
        return Converged(namespace, notes, extra)

    def _ready(
        self,
        env: Environment,
        namespace: str,
        notes: list[str],
        extra: dict[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any] | None,
        *,
        step: Step | None = None,
        into: Status | None = None,
    ) -> None:
        """Ready; `step` (the Provisioning or Updating not written yet) is announced first and written
        with it, into `into`."""
        message = f"Environment ready in namespace {namespace} at commit {env.spec.commit_sha[:7]}"
        if notes:
            message += " (" + "; ".join(notes) + ")"
        extra = {**extra, "retries": None, "failedAt": None, "permanent": None, "rolloutDeadline": None}
        # The first Ready's time, as its transition has it: a resync rebuilds that Ready from
        # provisionedAt once the object has moved on, and the two must be one record (`event_id`).
        at = now_iso()
        if not env.status.provisioned_at:
            extra["provisionedAt"] = at
        if step is not None and into is not None:
            entered = self._status(env, step.phase, step.reason, step.message, step.at, step.extra)
            env = self._announce(env, step.phase, step.reason, step.message, step.at, entered, None, step.occurred)
            into.update(entered)  # what Ready does not set (the policy's times) is kept from the step
        self.transition(env, Phase.READY, "Ready", message, extra, logger, into=into, at=at)

    # The application (PreviewTemplates) -------------------------------------------------------------

    def _roll_out(self, env: Environment, namespace: str) -> Rollout | None:
        """Apply the environment's template, if one matches; None for a namespace only."""
        if self.previews is None:
            return None
        previous, _ = Rollout.awaited(env.status.model_dump(by_alias=True, exclude_none=True))
        labels = environment_labels(env.name, env.spec.repository, env.spec.pull_request)
        try:
            return self.previews.rollout(env.spec, namespace, labels, previous)
        except TemplateError as err:
            raise PermanentFailure(err.reason, f"{err.message}. Fix the PreviewTemplate, then retry.") from err
        except KubeError as err:
            if err.temporary:
                raise TemporaryFailure("KubernetesError", f"{err}; retrying") from err
            raise PermanentFailure("KubernetesError", f"{err}. Check the operator's RBAC.") from err

    def _assess(self, namespace: str, inventory: list[Ref], workloads: list[tuple[str, str]]) -> Assessment:
        assert self.previews is not None
        try:
            return self.previews.applier.observe(namespace, inventory, workloads)
        except KubeError as err:
            raise TemporaryFailure("KubernetesError", f"{err}; retrying") from err

    def settle(self, name: str, logger: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> str | None:
        """Finish a rollout that was waiting for its workloads: Ready, Failed with the cause, or Failed
        at its deadline; None while it still waits (nothing is written then). Called on every change
        of the environment's workloads and pods, and periodically for the deadline."""
        body = self.kube.get_environment(name)
        if body is None or body["metadata"].get("deletionTimestamp") or self.previews is None:
            return None
        env = Environment.from_body(body)
        status = dict(body.get("status") or {})
        waiting = env.status.phase in (Phase.PROVISIONING, Phase.UPDATING) and env.status.reason == ROLLING_OUT
        if not waiting or env.status.observed_generation != env.generation:
            return None  # not waiting, or a newer spec whose handler is under way
        namespace = env.status.namespace or env.namespace(self.settings.namespace_prefix)
        inventory, workloads = Rollout.awaited(status)
        verdict = self._assess(namespace, inventory, workloads)
        if verdict.failed:
            failure = PermanentFailure(
                "RolloutFailed", _rollout_failed(verdict), status={"problems": _problems(verdict)}
            )
            self.fail(env, failure, logger)
            return Phase.FAILED.value
        if verdict.ready:
            self._ready(
                env, namespace, [f"app from template {(status.get('template') or {}).get('name')} ready"], {}, logger
            )
            return Phase.READY.value
        deadline = parse_time(status.get("rolloutDeadline"))
        if deadline is not None and datetime.datetime.now(datetime.UTC) >= deadline:
            message = f"Not ready by its deadline {status.get('rolloutDeadline')}: {verdict.summary()}"
            self.fail(
                env, PermanentFailure("RolloutTimeout", f"{message}. Fix the PreviewTemplate, then retry."), logger
            )
            return Phase.FAILED.value
        return None

    def _ensure(
        self,
        env: Environment,
        namespace: str,
        quota: children.Quota,
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> list[str]:
        """Create or mend the namespace and its children; return notes on anything that was mended."""
        notes: list[str] = []
        body = children.build_namespace(namespace, env.name, env.uid, env.spec)
        created = self.kube.create_namespace(body)
        fresh = created is not None
        if not fresh:
            existing = self.kube.get_namespace(namespace)
            if existing is None:  # deleted between the two calls
                raise TemporaryFailure("NamespaceRace", f"namespace {namespace} vanished while checked", delay=1)
            if existing["metadata"].get("deletionTimestamp"):
                # Whoever made it, it is going: the name is free once it is gone, so this is a wait,
                # never a conflict (the ownership check below would call it one for good).
                raise TemporaryFailure(
                    "NamespaceTerminating",
                    f"Namespace {namespace} is still terminating (from an earlier environment or someone "
                    "else's); waiting for it to be gone",
                    delay=2,
                    backoff=False,
                )
            if not self.owns(env, existing):
                raise PermanentFailure(
                    "NamespaceConflict",
                    f"Namespace {namespace} already exists and was not created by this PreviewEnvironment; "
                    "Ephemera leaves it untouched. Delete or rename that namespace, then retry "
                    f"(kubectl annotate pe {env.name} ephemera.dev/retry=$(date +%s) --overwrite).",
                )
        elif env.status.namespace:
            notes.append(f"namespace {namespace} had vanished and was re-created")
            logger.warning("Namespace %s had vanished and was re-created", namespace)
            self.recorder(
                env.ref(), "Warning", "NamespaceRecreated", f"Namespace {namespace} had vanished and was re-created"
            )

        wanted = [
            children.build_resource_quota(namespace, env.name, env.spec, quota),
            children.build_limit_range(namespace, env.name, env.spec, quota),
            children.build_network_policy(namespace, env.name, env.spec),
            children.build_egress_policy(namespace, env.name, env.spec, self.settings),
        ]
        for child in wanted:
            if self.kube.create_child(child) or fresh:
                continue
            name = child["metadata"]["name"]
            actual = self.kube.get_child(child["kind"], namespace, name)
            if actual is None:  # deleted since; the next attempt creates it
                raise TemporaryFailure("ChildRace", f"{child['kind']} {name} vanished while checked", delay=1)
            if not _same(child["spec"], actual.get("spec")):
                self.kube.replace_child(child, actual["metadata"]["resourceVersion"])
                if env.status.phase is not Phase.PROVISIONING:
                    notes.append(f"{child['kind']} {name} updated")
        return notes

    def ready_with(self, name: str, namespace: str) -> Environment | None:
        """Environment `name` if it is Ready with `namespace` and not being deleted: one that needs its
        namespace made again at once when that goes (any other is its handlers' to settle)."""
        body = self.kube.get_environment(name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # torn down on purpose
        if not self.settings.shard_handles(body["metadata"].get("labels")):
            return None  # moved to another shard meanwhile: that one mends it
        status = body.get("status") or {}
        if status.get("phase") != Phase.READY.value or status.get("namespace") != namespace:
            return None  # not settled: the running handlers will see it
        return Environment.from_body(body)

    def destroy(self, env: Environment, logger: logging.Logger | logging.LoggerAdapter[Any]) -> Terminating | None:
        """Delete the environment's namespaces (only its own). None once nothing is left (the end is
        announced); else the namespaces still terminating, for the caller to wait on and `finish`.

        Every failure is temporary here: the finalizer must not go before the teardown has run."""
        try:
            if env.status.phase is not Phase.DESTROYING:
                env = self.transition(env, Phase.DESTROYING, "Destroying", "Deleting the environment's namespace")
            left: list[tuple[str, str]] = []
            for namespace in env.namespaces(self.settings.namespace_prefix):
                existing = self.kube.get_namespace(namespace)
                if existing is None:
                    continue
                if not self.owns(env, existing):
                    logger.info("Namespace %s is not ours; left untouched", namespace)
                    continue
                if not existing["metadata"].get("deletionTimestamp"):
                    self.kube.delete_namespace(namespace, existing["metadata"]["uid"])
                left.append((namespace, existing["metadata"]["uid"]))
        except KubeError as err:
            raise TemporaryFailure("KubernetesError", f"{err}; retrying") from err
        if not left:
            self.destroyed(env)
            return None
        return Terminating(env, tuple(left))

    def finish(self, terminating: Terminating) -> bool:
        """Whether the namespaces are gone now (the end is announced then)."""
        for namespace, uid in terminating.namespaces:
            try:
                existing = self.kube.get_namespace(namespace)
            except KubeError as err:
                raise TemporaryFailure("KubernetesError", f"{err}; retrying") from err
            if existing is not None and existing["metadata"]["uid"] == uid:
                return False
        self.destroyed(terminating.env)
        return True

    def destroyed(self, env: Environment) -> None:
        """Announce the end (the object goes once its finalizer is released; no status to write)."""
        self.transitions.publish(
            env.announcement(
                old_phase=Phase.DESTROYING,
                phase=DESTROYED,
                reason="Destroyed",
                message="The environment's namespace is gone",
                at=now_iso(),
                status=env.status.model_dump(by_alias=True, exclude_none=True),
            )
        )

    def report_stuck(
        self, env: Environment, namespaces: list[str], after: float, setting: str, previous: str | None = None
    ) -> str:
        """Say on the object (status message, Warning Event) what keeps its namespaces from going;
        nothing new is written when the message is `previous` (what the status already says)."""
        why = {namespace: self.blockers(namespace) for namespace in namespaces}
        message = "; ".join(
            f"Namespace {namespace} is still not gone after {after:.0f} s ({setting}): {blockers}"
            for namespace, blockers in why.items()
            if blockers != "gone"
        )
        if not message or message == previous:
            return message
        self.kube.patch_environment_status(env.name, {"message": message, "reason": "DeletionStuck"})
        self.recorder(env.ref(), "Warning", "DeletionStuck", message)
        return message

    def blockers(self, namespace: str) -> str:
        """Why a terminating namespace is not gone yet: its finalizers and what it still holds."""
        existing = self.kube.get_namespace(namespace)
        if existing is None:
            return "gone"
        finalizers = (existing.get("spec") or {}).get("finalizers") or []
        finalizers += existing["metadata"].get("finalizers") or []
        conditions = [
            f"{c.get('type')}: {c.get('message')}"
            for c in (existing.get("status") or {}).get("conditions") or []
            if c.get("status") == "True"
        ]
        remaining = self.kube.namespace_blockers(namespace)
        parts = [f"finalizers {finalizers or 'none'}", f"remaining objects {remaining[:10] or 'none'}"]
        if conditions:
            parts.append("conditions " + "; ".join(conditions))
        return ", ".join(parts)
