"""Pydantic models of the PreviewEnvironment custom resource, matching crds/previewenvironments.yaml."""

from __future__ import annotations

import datetime
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ephemera.api.quantity import parse_quantity

GROUP = "ephemera.dev"
VERSION = "v1alpha1"
PLURAL = "previewenvironments"
KIND = "PreviewEnvironment"
API_VERSION = f"{GROUP}/{VERSION}"
# kopf\'s (group, version, plural) for the PreviewEnvironment handlers.
RESOURCE = (GROUP, VERSION, PLURAL)
TEMPLATE_KIND = "PreviewTemplate"
TEMPLATE_PLURAL = "previewtemplates"

# GitHub and GitHub Enterprise owners: letters, digits and hyphens (legacy accounts may have a
# hyphen at the end or two in a row), and for Enterprise Managed Users `_` and the enterprise's short
# code (`mona-cat_octo`). Repository names: letters, digits, `.`, `_` and `-`, at most 100.
REPOSITORY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}(_[A-Za-z0-9]{1,38})?/[A-Za-z0-9._-]{1,100}$"
SHA_PATTERN = r"^[0-9a-f]{40}$"
TITLE_MAX = 1024


class Phase(StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    READY = "Ready"
    UPDATING = "Updating"
    DESTROYING = "Destroying"
    FAILED = "Failed"
    # Waiting for a slot under the caps (EPHEMERA_POLICY_MAX_*): no namespace yet.
    QUEUED = "Queued"
    # Idle past its TTL: the namespace is deleted, the object stays until a push or a wake revives it.
    EXPIRED = "Expired"


class RecordPhase(StrEnum):
    """The phases only a record takes, never an object's status: the listeners' and records' own."""

    DESTROYED = "Destroyed"  # the object is gone


DESTROYED = RecordPhase.DESTROYED
# The phase a transition enters: one of the object's, or the end of its record.
TransitionPhase = Phase | RecordPhase


TRANSITION_PHASES: dict[str, TransitionPhase] = {phase.value: phase for phase in (*Phase, *RecordPhase)}


def parse_phase(value: str) -> TransitionPhase:
    """A phase as status or a record row writes it; ValueError for one that this version does not know."""
    try:
        return TRANSITION_PHASES[value]
    except KeyError:
        raise ValueError(f"unknown phase {value!r}: one of {', '.join(TRANSITION_PHASES)} was expected") from None


class Resources(BaseModel):
    """Quota of the environment's namespace; unset fields take the operator's defaults."""

    model_config = ConfigDict(extra="forbid")

    cpu: str | None = Field(None, description="CPU limit for all pods together (quantity).")
    memory: str | None = Field(None, description="Memory limit for all pods together (quantity).")
    pods: int | None = Field(None, ge=1, le=1000, description="The most pods at once.")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("must be a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
        if isinstance(value, int) and value < 0:
            raise ValueError("must not be negative")
        parse_quantity(value)
        return str(value)


class PreviewEnvironmentSpec(BaseModel):
    """The pull request an environment previews."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    repository: str = Field(pattern=REPOSITORY_PATTERN, max_length=140)
    pull_request: int = Field(alias="pullRequest", ge=1, strict=True)
    commit_sha: str = Field(alias="commitSha", pattern=SHA_PATTERN)
    branch: str = Field(min_length=1, max_length=255)
    installation_id: int | None = Field(None, alias="installationId", ge=1, strict=True)
    author: str | None = Field(None, max_length=39)
    title: str | None = Field(None, max_length=TITLE_MAX)
    resources: Resources = Field(default_factory=Resources)

    def to_k8s(self) -> dict[str, Any]:
        """The spec as the API server stores it (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=False)

    @property
    def owner(self) -> str:
        return self.repository.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.repository.split("/", 1)[1]


# metav1.Condition's rules for a condition's type and reason, and its message's length (the CRD says the same).
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
CONDITION_REASON_MAX = 1024
CONDITION_MESSAGE_MAX = 32768
READY_CONDITION = "Ready"


class Condition(BaseModel):
    """One entry of status.conditions, as metav1.Condition has it."""

    model_config = ConfigDict(populate_by_name=True)

    type: str = Field(max_length=316, pattern=CONDITION_TYPE_PATTERN)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, max_length=CONDITION_REASON_MAX, pattern=CONDITION_REASON_PATTERN)
    message: str = Field(max_length=CONDITION_MESSAGE_MAX)
    last_transition_time: str = Field(alias="lastTransitionTime")
    observed_generation: int | None = Field(None, alias="observedGeneration", ge=0)


class StatusProblem(BaseModel):
    """One object of the app that keeps a rollout from becoming ready, and why (status.problems)."""

    model_config = ConfigDict(extra="ignore")

    kind: str
    name: str
    reason: str
    message: str = ""


class PreviewEnvironmentStatus(BaseModel):
    """What the operator observed and did."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    phase: Phase | None = None
    namespace: str | None = None
    commit: str | None = None
    message: str | None = None
    reason: str | None = None
    observed_generation: int | None = Field(None, alias="observedGeneration")
    provisioned_at: str | None = Field(None, alias="provisionedAt")
    last_transition_time: str | None = Field(None, alias="lastTransitionTime")
    failed_at: str | None = Field(None, alias="failedAt")
    permanent: bool | None = None
    retries: int | None = None
    retry_request: str | None = Field(None, alias="retryRequest")
    url: str | None = None
    template: dict[str, Any] | None = None
    inventory: list[dict[str, str]] | None = None
    rollout_deadline: str | None = Field(None, alias="rolloutDeadline")
    problems: list[StatusProblem] | None = None
    reported: dict[str, Any] | None = None
    queue_position: int | None = Field(None, alias="queuePosition")
    queued_at: str | None = Field(None, alias="queuedAt")
    last_activity_at: str | None = Field(None, alias="lastActivityAt")
    expires_at: str | None = Field(None, alias="expiresAt")
    wake_request: str | None = Field(None, alias="wakeRequest")
    conditions: list[Condition] = Field(default_factory=list)
    # kopf's record of the last handled spec (naming.KOPF_STATUS): the framework's, never dumped, so no
    # status Ephemera writes or announces carries (or could roll back) kopf's record.
    kopf: dict[str, Any] | None = Field(None, exclude=True)


def ready_condition(
    phase: Phase, reason: str, message: str, *, generation: int, at: str, previous: list[Condition]
) -> Condition:
    """The Ready condition of an object entering `phase`: True exactly when the phase is Ready.

    Its lastTransitionTime is `at` only when its status changes (a Failed after a Provisioning keeps
    the time Ready became False), as metav1.Condition has it. A reason that metav1 would refuse is
    made one (the phase's own name when nothing is left of it), so that the status write never fails."""
    status: Literal["True", "False"] = "True" if phase is Phase.READY else "False"
    was = next((c for c in previous if c.type == READY_CONDITION), None)
    since = was.last_transition_time if was is not None and was.status == status else at
    return Condition(
        type=READY_CONDITION,
        status=status,
        reason=condition_reason(reason) or phase.value,
        message=message[:CONDITION_MESSAGE_MAX],
        last_transition_time=since,
        observed_generation=generation,
    )


def condition_reason(reason: str) -> str:
    """`reason` as metav1.Condition allows it (CamelCase: a letter, then letters, digits, `_`, `,`, `:`,
    not ending in `,` or `:`); empty when nothing of it is left."""
    kept = re.sub(r"[^A-Za-z0-9_,:]", "", reason)[:CONDITION_REASON_MAX]
    return re.sub(r"^[^A-Za-z]+", "", kept).rstrip(",:")


def now_iso() -> str:
    """The current time as Kubernetes writes it (RFC 3339, seconds, UTC)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
