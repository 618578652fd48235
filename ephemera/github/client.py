"""GitHub credentials: a GitHub App's installation tokens (cached until shortly before they expire),
or a plain token for simple setups; and who Ephemera is on GitHub (which installation covers a
repository, which comments are its own)."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from github import Auth, Github, GithubException, GithubIntegration

from ephemera.config import Settings

# Renew an installation token this long before GitHub says it expires.
REFRESH_MARGIN = datetime.timedelta(minutes=5)


# Repositories whose installation is remembered at most (expired answers are dropped past it).
INSTALLATION_CACHE_SIZE = 4096


class NoCredentials(Exception):
    """Reporting is not configured for this object (no App, no token, or no installation id)."""


class NotInstalled(Exception):
    """The object's installation does not cover its repository: nothing may be posted for it.

    `spec.installationId` and `spec.repository` are written by whoever may create PreviewEnvironments;
    without this check they could point one account's installation at another account's repository."""


@dataclass(frozen=True)
class Identity:
    """Who Ephemera posts as: the App (its id and its bot user `<slug>[bot]`) or the token's user.
    Only comments written by this identity are ever edited."""

    app_id: int | None = None
    bot_login: str | None = None
    login: str | None = None

    def wrote(self, user_login: str | None, app_id: int | None) -> bool:
        """Whether a comment by `user_login`, made through the App `app_id` (if any), is ours."""
        if self.app_id is not None and app_id == self.app_id:
            return True
        ours = {name.lower() for name in (self.bot_login, self.login) if name}
        return user_login is not None and user_login.lower() in ours


@dataclass(frozen=True)
class _Coverage:
    installation_id: int | None  # None: the App is not installed on the repository
    app_slug: str | None
    expires: float  # GitHubAuth's clock (time.monotonic())


@dataclass
class _Cached:
    client: Github
    expires_at: datetime.datetime


class GitHubAuth:
    """Hands out authenticated PyGithub clients; thread-safe (reports run in worker threads)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        # What the installations' answers expire by (a test turns it by hand, not by waiting).
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[int, _Cached] = {}
        self._fetching: dict[int, threading.Lock] = {}  # installation -> held while its token is asked for
        self._coverage: dict[str, _Coverage] = {}  # repository (lower case) -> its installation of the App
        self._asking: dict[str, threading.Lock] = {}  # repository (lower case) -> held while GitHub is asked
        self._token_login: str | None = None
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

    def _client(self, auth: Auth.Auth) -> Github:
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
            cached = self._cached(installation_id)
            if cached is not None:
                return cached
            with self._lock:
                fetching = self._fetching.setdefault(installation_id, threading.Lock())
            # One token request per installation at a time: the reports of a burst (in several workers)
            # wait for the first one's token rather than each asking GitHub for another.
            with fetching:
                cached = self._cached(installation_id)
                if cached is not None:
                    return cached
                now = datetime.datetime.now(datetime.UTC)
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

    def _cached(self, installation_id: int) -> Github | None:
        """The installation's client while its token is good for more than REFRESH_MARGIN."""
        now = datetime.datetime.now(datetime.UTC)
        with self._lock:
            cached = self._cache.get(installation_id)
        return cached.client if cached is not None and cached.expires_at - REFRESH_MARGIN > now else None

    @property
    def app_mode(self) -> bool:
        """Whether a GitHub App is configured (else a plain token, or nothing)."""
        return self._integration is not None

    def app_client(self) -> Github:
        """A client authenticated as the App itself (its JWT), for the `/app` endpoints; NoCredentials
        without an App. PyGithub makes a fresh JWT for each request."""
        key = self.settings.private_key()
        if self.settings.github_app_id is None or not key:
            raise NoCredentials("no GitHub App (EPHEMERA_GITHUB_APP_ID + key) configured")
        return self._client(Auth.AppAuth(self.settings.github_app_id, key))

    def uses_installation(self, installation_id: int | None) -> bool:
        """Whether `client_for(installation_id)` hands out an installation token (else the plain token)."""
        return self._integration is not None and installation_id is not None

    def check_installation(self, installation_id: int | None, repository: str) -> None:
        """Raise NotInstalled unless GitHub says the App's installation on `repository` is
        `installation_id` (App mode only: a plain token's reach is what its owner gave it).

        Asked with the App's JWT (`GET /repos/{owner}/{repo}/installation`): one request per repository
        per EPHEMERA_GITHUB_INSTALLATION_CACHE_TTL, answers "not installed" (404) included. Other errors
        propagate as GithubException (retried like any report)."""
        if not self.uses_installation(installation_id):
            return
        found = self._installation_of(repository)
        if found.installation_id is None:
            raise NotInstalled(f"the GitHub App is not installed on {repository}")
        if found.installation_id != installation_id:
            raise NotInstalled(
                f"installation {installation_id} does not cover {repository} "
                f"(the App's installation there is {found.installation_id})"
            )

    def identity(self, installation_id: int | None, repository: str, client: Github) -> Identity:
        """Who posts for this object: the App (after check_installation) or the token's user."""
        if self.uses_installation(installation_id):
            slug = self._installation_of(repository).app_slug
            return Identity(app_id=self.settings.github_app_id, bot_login=f"{slug}[bot]" if slug else None)
        with self._lock:
            login = self._token_login
        if login is None:
            login = client.get_user().login  # GET /user, once per process
            with self._lock:
                self._token_login = login
        return Identity(login=login)

    def _installation_of(self, repository: str) -> _Coverage:
        assert self._integration is not None
        key = repository.lower()
        with self._lock:
            cached = self._coverage.get(key)
            if cached is not None and cached.expires > self._clock():
                return cached
            asking = self._asking.setdefault(key, threading.Lock())
        # One question per repository at a time: the reports of a burst on one repository (one per PR,
        # in several workers) wait for the first answer rather than each asking GitHub again.
        with asking:
            now = self._clock()
            with self._lock:
                cached = self._coverage.get(key)
            if cached is not None and cached.expires > now:
                return cached
            try:
                found = self._ask_installation(repository, now + self.settings.github_installation_cache_ttl)
            except BaseException:
                with self._lock:
                    self._asking.pop(key, None)  # those waiting ask in turn
                raise
            with self._lock:
                if len(self._coverage) >= INSTALLATION_CACHE_SIZE:
                    self._coverage = {k: v for k, v in self._coverage.items() if v.expires > now}
                self._coverage[key] = found
                self._asking.pop(key, None)  # those already waiting hold it; later ones find the answer
            return found

    def _ask_installation(self, repository: str, expires: float) -> _Coverage:
        assert self._integration is not None
        owner, _, name = repository.partition("/")
        try:
            installation = self._integration.get_repo_installation(owner, name)
            return _Coverage(installation.id, installation.app_slug, expires)
        except GithubException as err:
            if err.status != 404:
                raise
            return _Coverage(None, None, expires)  # not installed there (or no such repository)

    def invalidate(self, installation_id: int | None) -> None:
        """Forget a token GitHub refused (401), so the next call fetches a new one."""
        if installation_id is not None:
            with self._lock:
                self._cache.pop(installation_id, None)
