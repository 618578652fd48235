"""Ephemera's one settings class: every setting is an `EPHEMERA_*` environment variable."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ephemera.quantity import parse_quantity

# EPHEMERA_* variables that belong to the development tools, not to the processes.
NOT_SETTINGS = frozenset({"EPHEMERA_CACHE", "EPHEMERA_SOAK"})


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
    webhook_max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted body.")
    webhook_body_timeout: float = Field(10.0, gt=0, description="Seconds to receive a whole request body.")
    webhook_draft_prs: bool = Field(True, description="Create environments for draft PRs too.")
    webhook_delivery_cache: int = Field(
        10000, ge=0, description="Delivery ids remembered per replica to drop redeliveries early."
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
    retry_backoff: float = Field(60.0, gt=0, description="First retry delay in seconds; doubles each attempt.")
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
        None, description="kopf peering name for several replicas (one active); unset runs standalone."
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
    environment_url: str | None = Field(
        None, description="Template of an environment's URL, e.g. https://{namespace}.preview.example.com."
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
    github_status_context: str = Field("ephemera/preview", description="Context of the commit status.")
    github_timeout: float = Field(15.0, gt=0, description="Seconds per GitHub request.")
    github_retry_max_delay: float = Field(300.0, gt=0, description="Longest wait between report retries.")

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
        for name in ("default_cpu", "default_memory", "max_cpu", "max_memory"):
            try:
                parse_quantity(getattr(self, name))
            except ValueError as err:
                raise ValueError(f"EPHEMERA_{name.upper()}: {err}") from err
        if self.soft_time_limit > self.hard_time_limit:
            raise ValueError("EPHEMERA_SOFT_TIME_LIMIT must not exceed EPHEMERA_HARD_TIME_LIMIT")
        return self

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
