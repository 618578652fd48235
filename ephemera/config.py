"""Ephemera's one settings class: every setting is an `EPHEMERA_*` environment variable."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ephemera.api.models import REPOSITORY_PATTERN
from ephemera.api.naming import SHARD_LABEL
from ephemera.api.quantity import parse_quantity

# EPHEMERA_* variables that belong to the development tools, not to the processes.
NOT_SETTINGS = frozenset({"EPHEMERA_CACHE", "EPHEMERA_SOAK", "EPHEMERA_TOOLS_DIR"})

# After a secondary rate limit that names no Retry-After, GitHub asks for "at least one minute".
GITHUB_SECONDARY_RATE_LIMIT_DELAY = 60.0
# An allowlist entry: an owner (user or organisation) or owner/name.
ALLOW_ENTRY = r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}(_[A-Za-z0-9]{1,38})?(/[A-Za-z0-9._-]{1,100})?$"


class Settings(BaseSettings):
    """Settings of both processes. Defaults run locally; the README's table documents each one."""

    model_config = SettingsConfigDict(env_prefix="EPHEMERA_", extra="forbid", case_sensitive=False)

    # Shared
    log_level: str = Field("INFO", description="Log level of both processes.")
    log_format: str = Field("json", pattern="^(json|text)$", description="`json` or `text` log lines.")
    kubeconfig: Path | None = Field(
        None, description="Kubeconfig to use; unset means in-cluster config, then the default kubeconfig."
    )

    # Webhook
    webhook_host: str = Field("127.0.0.1", description="Address the webhook listens on.")
    webhook_port: int = Field(8080, ge=0, le=65535, description="Port of the webhook (and its health/metrics).")
    webhook_secret: SecretStr | None = Field(None, description="GitHub webhook secret (required).")
    webhook_insecure_no_secret: bool = Field(
        False, description="Development only: accept unsigned webhooks when no secret is set."
    )
    # GitHub's largest example pull_request payload is 31,203 bytes; 320 KiB keeps a 10x margin and
    # still holds a PR description at its 65,536-character maximum.
    webhook_max_body_bytes: int = Field(320 * 1024, ge=1024, description="Largest accepted body.")
    webhook_body_timeout: float = Field(10.0, gt=0, description="Seconds to receive a whole request body.")
    webhook_max_in_flight: int = Field(
        32, ge=1, description="Bodies received at once at most; more get 503 with Retry-After."
    )
    webhook_draft_prs: bool = Field(True, description="Create environments for draft PRs too.")
    webhook_delivery_cache: int = Field(
        10000, ge=0, description="Delivery ids remembered per replica to drop redeliveries early."
    )
    webhook_namespace: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="Namespace of the closed-PR ConfigMaps; unset: the pod's own namespace, else `default`.",
    )
    webhook_tombstone_retention: float = Field(
        30 * 24 * 3600, gt=0, description="Seconds a closed PR is remembered, so a replayed event cannot revive it."
    )
    webhook_mirror: bool = Field(
        True,
        description="Keep the closed-PR records and the legacy-named environments in memory from a watch, so "
        "that a new PR costs one API request (the create) instead of three; false reads both on every event.",
    )

    # Operator
    operator_host: str = Field("127.0.0.1", description="Address of the operator's health/metrics server.")
    operator_port: int = Field(8081, ge=0, le=65535, description="Port of the operator's /healthz and /metrics.")
    namespace_prefix: str = Field(
        "pr", pattern=r"^[a-z]([a-z0-9-]{0,18}[a-z0-9])?$", description="Prefix of environment namespaces."
    )
    default_cpu: str = Field("2", description="Quota CPU when spec.resources.cpu is not set.")
    default_memory: str = Field("4Gi", description="Quota memory when spec.resources.memory is not set.")
    default_pods: int = Field(20, ge=1, description="Quota pods when spec.resources.pods is not set.")
    max_cpu: str = Field("8", description="Ceiling of any environment's CPU quota.")
    max_memory: str = Field("16Gi", description="Ceiling of any environment's memory quota.")
    max_pods: int = Field(100, ge=1, description="Ceiling of any environment's pod quota.")
    soft_time_limit: float = Field(25 * 60, gt=0, description="Seconds before a slow provision is warned about.")
    hard_time_limit: float = Field(30 * 60, gt=0, description="Seconds before a provision is marked Failed.")
    namespace_delete_timeout: float = Field(
        30 * 60, gt=0, description="Seconds to wait for a namespace to be gone on teardown before reporting."
    )
    stale_threshold: float = Field(30 * 60, gt=0, description="Seconds in a transitional phase before stale.")
    sweep_interval: float = Field(5 * 60, gt=0, description="Seconds between stale/orphan sweeps.")
    retry_window: float = Field(60 * 60, gt=0, description="Failed environments younger than this are retried.")
    retry_max_attempts: int = Field(3, ge=0, description="Automatic retries of one failure at most.")
    retry_backoff: float = Field(
        60.0, gt=0, description="Longest first retry wait in seconds (full jitter); doubles each attempt."
    )
    record_retention: float = Field(7 * 24 * 3600, gt=0, description="Seconds destroyed records are kept.")
    purge_interval: float = Field(3600, gt=0, description="Seconds between purges of old records.")
    purge_batch: int = Field(500, ge=1, description="Records deleted per purge statement.")
    resync_interval: float = Field(300, gt=0, description="Seconds between database resyncs with the cluster.")
    record_queue_limit: int = Field(
        10_000, ge=1, description="Transitions the records writer queues at most while the database is away."
    )
    record_drain_timeout: float = Field(
        10.0, ge=0, description="Seconds the operator spends writing queued records when it stops."
    )
    peering: str | None = Field(
        None,
        description="kopf peering name for several replicas (one active); unset runs standalone. With "
        "EPHEMERA_SHARDS > 1 each shard keeps its own: `<name>-shard-<EPHEMERA_SHARD>`.",
    )
    peering_priority: int | None = Field(
        None, description="This replica's peering priority (highest is active); unset picks a random one."
    )
    peering_lifetime: int = Field(
        60, ge=10, description="Seconds a silent replica counts as alive before a standby takes over."
    )
    workers: int = Field(
        50, ge=1, description="Threads for the operator's handlers: most objects provisioned or mended at once."
    )
    worker_limit: int = Field(
        500,
        ge=0,
        description="PreviewEnvironments the operator works on at once (kopf's per-object workers); more wait "
        "their turn holding only their events (~10 KB each). Bounds the memory a mass creation touches; "
        "0: no limit.",
    )
    watch_consistency_timeout: float = Field(
        60.0,
        ge=0,
        description="Seconds a handler's own write is awaited on the watch before an older event is acted on.",
    )
    shards: int = Field(
        1,
        ge=1,
        le=1000,
        description="Operator shards (webhook and operator alike): each object is labelled with the hash of its "
        "repository modulo this, and each shard's operator handles only its own label.",
    )
    shard: int = Field(0, ge=0, description="This operator's shard, 0 to EPHEMERA_SHARDS-1.")
    environment_url: str | None = Field(
        None, description="Template of an environment's URL, e.g. https://{namespace}.preview.example.com."
    )
    # The application in a preview (PreviewTemplates).
    preview_domain: str = Field(
        "preview.localhost",
        pattern=r"^[a-z0-9]([a-z0-9.-]{0,200}[a-z0-9])?$",
        description="Domain under which each preview gets a host, `<namespace>.<domain>` ({{ host }} in templates).",
    )
    helm_binary: Path | None = Field(
        None, description="The helm binary that renders templates' charts; unset means `helm` on PATH."
    )
    template_deny: list[str] = Field(
        default_factory=lambda: ["Namespace", "ClusterRole", "ClusterRoleBinding", "RoleBinding/ClusterRole"],
        description="Kinds a template may not create (`RoleBinding/ClusterRole`: a RoleBinding to a ClusterRole).",
    )
    template_rollout_rate: float = Field(
        2.0,
        gt=0,
        le=1000,
        description="Environments per second re-provisioned when a PreviewTemplate changes (a bounded rollout).",
    )
    # What else an environment's ResourceQuota caps (besides cpu, memory and pods).
    quota_load_balancers: int = Field(0, ge=0, description="Services of type LoadBalancer per environment.")
    quota_node_ports: int = Field(0, ge=0, description="Service node ports per environment.")
    quota_persistent_volume_claims: int = Field(5, ge=0, description="PersistentVolumeClaims per environment.")
    quota_storage: str = Field("20Gi", description="Storage requested by all of an environment's claims.")
    quota_ephemeral_storage: str = Field("10Gi", description="Ephemeral storage of all of an environment's pods.")
    quota_config_maps: int = Field(50, ge=1, description="ConfigMaps per environment.")
    quota_secrets: int = Field(50, ge=0, description="Secrets per environment.")
    quota_services: int = Field(20, ge=0, description="Services per environment.")
    # Egress of an environment's pods: DNS and the namespace itself always, and these.
    egress_allow_cidrs: list[str] = Field(
        default_factory=list, description='CIDRs an environment may reach, as JSON: ["10.20.0.0/16"].'
    )
    egress_extra_rules: list[dict[str, Any]] = Field(
        default_factory=list, description="More NetworkPolicy egress rules, as a JSON list of Kubernetes objects."
    )

    # Dashboard (`ephemera dashboard`): a read-only page of its own, never on the webhook's listener.
    dashboard_host: str = Field("127.0.0.1", description="Address the dashboard listens on.")
    dashboard_port: int = Field(8082, ge=0, le=65535, description="Port of the dashboard and its /healthz.")
    dashboard_operator_metrics_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="The operator's /metrics, where the dashboard reads the GitHub rate limit left and the record "
        "backlog; unset: those two are shown as not configured.",
    )

    # Records
    database_url: str = Field(
        "sqlite+aiosqlite:///ephemera.db",
        description="SQLAlchemy URL of the records database (postgresql+asyncpg://... in production).",
    )

    # GitHub
    github_api_url: str = Field("https://api.github.com", description="GitHub REST API base URL.")
    github_app_id: int | None = Field(None, description="GitHub App id.")
    github_private_key: SecretStr | None = Field(None, description="GitHub App private key (PEM).")
    github_private_key_file: Path | None = Field(None, description="File holding the App's private key.")
    github_token: SecretStr | None = Field(None, description="A plain token instead of an App.")
    github_status_context: str = Field(
        "ephemera/preview", description="Context of the commit status, and name of the check run."
    )
    github_timeout: float = Field(15.0, gt=0, description="Seconds per GitHub request.")
    github_retry_max_delay: float = Field(300.0, gt=0, description="Longest wait between report retries.")
    github_secondary_rate_limit_delay: float = Field(
        GITHUB_SECONDARY_RATE_LIMIT_DELAY,
        gt=0,
        description="First wait after a secondary rate limit without Retry-After (doubles; never shortened "
        "by EPHEMERA_GITHUB_RETRY_MAX_DELAY). GitHub asks for at least 60; lower it only in tests.",
    )
    github_installation_cache_ttl: float = Field(
        600.0, gt=0, description="Seconds GitHub's answer to which installation covers a repository is kept."
    )

    # Backstop: the cluster converges on GitHub's open PRs, and failed deliveries are redelivered.
    pr_resync_interval: float = Field(
        600.0, gt=0, description="Seconds between backstop passes (open PRs vs environments, redeliveries)."
    )
    backstop_enabled: bool = Field(True, description="Run the backstop in the operator (active replica only).")
    backstop_repositories: list[str] = Field(
        default_factory=list,
        description='Token mode: the repositories whose open PRs the backstop lists, as JSON: ["owner/name"].',
    )
    backstop_teardown_grace: float = Field(
        24 * 3600.0,
        ge=0,
        description="Seconds between an uninstall, suspension, removal or transfer and the teardown it causes.",
    )
    backstop_redelivery_window: float = Field(
        3 * 24 * 3600.0, gt=0, description="Oldest failed delivery redelivered when there is no cursor yet (s)."
    )
    backstop_namespace: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="Namespace of the backstop's cursor ConfigMap; unset: EPHEMERA_WEBHOOK_NAMESPACE's rule.",
    )

    # Result hooks: a signed CloudEvent to each target on every transition (ephemera/hooks.py).
    hook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Targets of the result hooks (http(s) URLs), comma-separated or a JSON list.",
    )
    hook_secret: SecretStr | None = Field(
        None, description="Key of the hooks' HMAC-SHA256 signature header (16 bytes or more; required with hooks)."
    )
    hook_max_attempts: int = Field(5, ge=1, description="Attempts at delivering one event to one target.")
    hook_timeout: float = Field(10.0, gt=0, description="Seconds per hook request.")
    hook_retry_backoff: float = Field(1.0, gt=0, description="Base of the hooks' retry backoff in seconds.")
    hook_retry_max_delay: float = Field(60.0, gt=0, description="Longest wait between two attempts of a hook.")
    hook_queue_limit: int = Field(10_000, ge=1, description="Hook events queued at most, over all targets.")

    @field_validator("hook_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        """A JSON list, or URLs separated by commas."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    # Policy: which PRs get a preview (README, "Policy"). Drafts: EPHEMERA_WEBHOOK_DRAFT_PRS.
    policy_allow: list[str] = Field(
        default_factory=list,
        description='Owners and repositories whose PRs may get a preview, as JSON: ["octo-org", "octo/shop"]; '
        "empty: every repository the App is installed on (or the token reaches).",
    )
    policy_bot_authors: list[str] = Field(
        default_factory=lambda: ["dependabot[bot]", "renovate[bot]"],
        description="Logins whose PRs get no preview (case-insensitive), as JSON; [] admits bots.",
    )
    policy_skip_all_bots: bool = Field(
        False, description="Also refuse every PR whose author GitHub marks as a bot (user.type Bot)."
    )
    policy_opt_in: bool = Field(
        False, description="Opt-in mode: only PRs labelled EPHEMERA_POLICY_OPT_IN_LABEL get a preview."
    )
    policy_opt_in_label: str = Field(
        "preview", min_length=1, max_length=50, description="The label that opts a PR in (opt-in mode)."
    )
    policy_forks: Literal["approval", "allow", "deny"] = Field(
        "approval",
        description="PRs from forks: `approval` (a writer applies EPHEMERA_POLICY_APPROVAL_LABEL), `allow`, `deny`.",
    )
    policy_approval_label: str = Field(
        "preview-approved", min_length=1, max_length=50, description="The label by which a writer approves a fork."
    )
    policy_reapprove_on_push: bool = Field(
        True, description="A push to an approved fork's PR removes its preview until a writer approves again."
    )

    # Lifecycle policy: expiry of idle environments, caps on live ones and on provisions in flight.
    policy_ttl: float = Field(
        72 * 3600.0,
        ge=0,
        description="Seconds without a push after which an environment expires (namespace deleted); 0: never.",
    )
    policy_max_environments: int = Field(
        0, ge=0, description="Live environments in the cluster at most; more are Queued. 0: no limit."
    )
    policy_max_environments_per_repository: int = Field(
        0, ge=0, description="Live environments per repository at most; more are Queued. 0: no limit."
    )
    policy_max_provisions_in_flight: int = Field(
        0, ge=0, description="Environments in Provisioning at once at most; more wait Queued. 0: no limit."
    )
    policy_interval: float = Field(
        5.0, gt=0, description="Seconds between the expiry and admission rounds (from memory: no API call when idle)."
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        unknown = sorted(
            key
            for key in os.environ
            if key.upper().startswith("EPHEMERA_")
            and key.upper() not in NOT_SETTINGS
            and key[len("EPHEMERA_") :].lower() not in type(self).model_fields
        )
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}: see the README's configuration table")
        for name in (
            "default_cpu",
            "default_memory",
            "max_cpu",
            "max_memory",
            "quota_storage",
            "quota_ephemeral_storage",
        ):
            try:
                parse_quantity(getattr(self, name))
            except ValueError as err:
                raise ValueError(f"EPHEMERA_{name.upper()}: {err}") from err
        for cidr in self.egress_allow_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as err:
                raise ValueError(f"EPHEMERA_EGRESS_ALLOW_CIDRS: {err} (write a network, e.g. 10.20.0.0/16)") from err
        for entry in self.policy_allow:
            if not re.fullmatch(ALLOW_ENTRY, entry):
                raise ValueError(f"EPHEMERA_POLICY_ALLOW: {entry!r} is neither an owner nor owner/name")
        for repository in self.backstop_repositories:
            if not re.fullmatch(REPOSITORY_PATTERN, repository):
                raise ValueError(f"EPHEMERA_BACKSTOP_REPOSITORIES: {repository!r} is not owner/name")
        for url in self.hook_urls:
            if not re.fullmatch(r"https?://[^\s/]+\S*", url):
                raise ValueError(f"EPHEMERA_HOOK_URLS: {url!r} is not an http(s) URL")
        if self.hook_urls and len((self.hook_secret or SecretStr("")).get_secret_value().encode()) < 16:
            raise ValueError("EPHEMERA_HOOK_URLS needs EPHEMERA_HOOK_SECRET (16 bytes or more): every hook is signed")
        if self.shard >= self.shards:
            raise ValueError(f"EPHEMERA_SHARD={self.shard} must be below EPHEMERA_SHARDS={self.shards}")
        if self.shards > 1 and self.peering is not None and not self.peering.endswith(f"-shard-{self.shard}"):
            # Each shard stands by for itself: one peering object for two shards would pause all but one.
            self.peering = f"{self.peering}-shard-{self.shard}"
        if self.soft_time_limit > self.hard_time_limit:
            raise ValueError("EPHEMERA_SOFT_TIME_LIMIT must not exceed EPHEMERA_HARD_TIME_LIMIT")
        return self

    def shard_handles(self, labels: Mapping[str, str] | None) -> bool:
        """Whether this operator's shard handles an object with these labels (unsharded: every one)."""
        return self.shards == 1 or (labels or {}).get(SHARD_LABEL) == str(self.shard)

    def private_key(self) -> str | None:
        """The GitHub App private key, from the setting or the file."""
        if self.github_private_key is not None:
            return self.github_private_key.get_secret_value()
        if self.github_private_key_file is not None:
            return self.github_private_key_file.read_text()
        return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
