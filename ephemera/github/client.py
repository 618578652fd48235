"""GitHub credentials: a GitHub App's installation tokens (cached until shortly before they expire),
or a plain token for simple setups."""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

from github import Auth, Github, GithubIntegration

from ephemera.config import Settings

# Renew an installation token this long before GitHub says it expires.
REFRESH_MARGIN = datetime.timedelta(minutes=5)


class NoCredentials(Exception):
    """Reporting is not configured for this object (no App, no token, or no installation id)."""


@dataclass
class _Cached:
    client: Github
    expires_at: datetime.datetime


class GitHubAuth:
    """Hands out authenticated PyGithub clients; thread-safe (reports run in worker threads)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._cache: dict[int, _Cached] = {}
        self._token_client: Github | None = None
        key = settings.private_key()
        self._integration: GithubIntegration | None = None
        if settings.github_app_id is not None and key:
            self._integration = GithubIntegration(
                auth=Auth.AppAuth(settings.github_app_id, key),
                base_url=settings.github_api_url,
                timeout=int(settings.github_timeout),
                retry=None,
                seconds_between_requests=None,
                seconds_between_writes=None,
            )
        if settings.github_token is not None:
            self._token_client = self._client(Auth.Token(settings.github_token.get_secret_value()))

    @property
    def configured(self) -> bool:
        return self._integration is not None or self._token_client is not None

    def _client(self, auth: Auth.Token) -> Github:
        # Retries and pacing are the reporter's: PyGithub must neither sleep nor retry on its own.
        return Github(
            auth=auth,
            base_url=self.settings.github_api_url,
            timeout=int(self.settings.github_timeout),
            retry=None,
            seconds_between_requests=None,
            seconds_between_writes=None,
            lazy=True,
        )

    def client_for(self, installation_id: int | None) -> Github:
        """A client for the installation (App), else the plain-token client; NoCredentials if neither."""
        if self._integration is not None and installation_id is not None:
            now = datetime.datetime.now(datetime.UTC)
            with self._lock:
                cached = self._cache.get(installation_id)
                if cached is not None and cached.expires_at - REFRESH_MARGIN > now:
                    return cached.client
            token = self._integration.get_access_token(installation_id)
            expires = token.expires_at or now + datetime.timedelta(hours=1)
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=datetime.UTC)
            client = self._client(Auth.Token(token.token))
            with self._lock:
                self._cache[installation_id] = _Cached(client, expires)
            return client
        if self._token_client is not None:
            return self._token_client
        if self._integration is not None:
            raise NoCredentials("the object has no spec.installationId and no EPHEMERA_GITHUB_TOKEN is set")
        raise NoCredentials("no GitHub App (EPHEMERA_GITHUB_APP_ID + key) and no EPHEMERA_GITHUB_TOKEN configured")

    def invalidate(self, installation_id: int | None) -> None:
        """Forget a token GitHub refused (401), so the next call fetches a new one."""
        if installation_id is not None:
            with self._lock:
                self._cache.pop(installation_id, None)
