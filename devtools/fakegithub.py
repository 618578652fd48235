"""A local server that answers like GitHub's REST API, for PyGithub under test.

It checks the App JWT against the App's public key, issues installation tokens that expire and
requires one (or a user's plain token) on every call, serves the endpoints Ephemera uses (commit
statuses, issue comments, deployments and their statuses, check runs, which installation covers a
repository, the authenticated user), records every call, and can inject 5xx answers, rate limits and
latency.
An installation covers the repositories of its account (all, or a selection); its token is refused
elsewhere, as GitHub refuses it. Comments carry their author: the App's bot user (and the App) for an
installation token, the user for a user's token. Check runs are refused to user tokens and to an
installation whose App lacks the `checks: write` permission, as GitHub refuses them, and only the App
that made a check run may edit it. Its answers are shaped from real recorded exchanges
(../shared/fixtures/github/rest-recordings).

    python -m devtools.fakegithub --port 8099   (serves /_calls for a look at what it received)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import re
import secrets
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

RECORDINGS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "github" / "rest-recordings"


def recorded(name: str, index: int = 0) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of the `index`-th exchange of a recording (bare, if none are at hand)."""
    path = RECORDINGS / f"{name}.txt"
    if not path.exists():  # outside the workplace (e.g. `make run` elsewhere): plain answers will do
        return 200, {}, {}
    lines = path.read_text().split("\n")
    exchanges = [i for i, line in enumerate(lines) if line in ("http", "https") and i + 9 < len(lines)]
    start = exchanges[index]
    status = int(lines[start + 7])
    headers = dict(eval(lines[start + 8]))
    return status, headers, json.loads(lines[start + 9])


JSON_BODY: web.RequestKey[Any] = web.RequestKey("json", object)
# Who made the request: (installation id, None) for an installation token, (None, login) for a user's token.
CALLER: web.RequestKey[tuple[int | None, str | None]] = web.RequestKey("caller", tuple)
# Paths answered with the App's JWT rather than an installation token.
JWT_PATH = re.compile(r"/app(/.*)?|/repos/[^/]+/[^/]+/installation")
REPO_PATH = re.compile(r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)(/.*)?")
# What the App may do on an installation (as an App's settings grant it); tests take some away.
APP_PERMISSIONS = {"statuses": "write", "pull_requests": "write", "deployments": "write", "checks": "write"}
CHECK_RUN_STATUSES = ("queued", "in_progress", "completed")
CHECK_RUN_CONCLUSIONS = ("action_required", "cancelled", "failure", "neutral", "success", "skipped", "timed_out")
SECONDARY_RATE_LIMIT_MESSAGE = (
    "You have exceeded a secondary rate limit. Please wait a few minutes before you try again. If you reach out "
    "to GitHub Support for help, please include the request ID 6EC6:2C9F:35D9B07:76A8CC9:5BCEBCD5."
)
SECONDARY_RATE_LIMIT_DOCS = (
    "https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api#about-secondary-rate-limits"
)


@dataclass
class Installation:
    """One installation of the App: on an account, for all its repositories or a selection."""

    id: int
    account: str | None  # None: the tests' catch-all, an installation on every account
    repositories: set[str] | None = None  # full names of the selected repositories; None: all of them
    suspended_at: str | None = None  # when someone suspended it (GitHub still lists it, so marked)
    permissions: dict[str, str] = field(default_factory=lambda: dict(APP_PERMISSIONS))

    def could_cover(self, repository: str) -> bool:
        """Whether it covers `repository` (FakeGitHub.covers also asks whether another installation does)."""
        if self.repositories is not None:
            return repository.lower() in {r.lower() for r in self.repositories}
        return self.account is None or repository.split("/")[0].lower() == self.account.lower()


@dataclass
class Fault:
    """Answer the next `count` matching calls with `status` (after `delay` seconds), or just delay them."""

    method: str = ".*"
    path: str = ".*"
    status: int | None = 502
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=lambda: {"message": "Server Error"})
    delay: float = 0.0
    count: int = 1
    request_body: str | None = None  # a pattern the request's body must contain, if set

    def matches(self, method: str, path: str, raw: str = "") -> bool:
        return (
            bool(re.fullmatch(self.method, method) and re.fullmatch(self.path, path))
            and (self.request_body is None or re.search(self.request_body, raw) is not None)
            and self.count > 0
        )


@dataclass
class Call:
    method: str
    path: str
    body: Any
    installation: int | None
    status: int
    at: float
    user: str | None = None  # the login behind a user's token


class FakeGitHub:
    """State and handlers of the fake API."""

    def __init__(self, app_id: int = 4242, token_ttl: float = 3600.0, app_slug: str = "ephemera-preview") -> None:
        self.app_id = app_id
        self.app_slug = app_slug
        self.token_ttl = token_ttl
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.public_key = key.public_key()
        # 1 is the fixture payloads' installation (on Codertocat); 4242 is everywhere else.
        self.installations: dict[int, Installation] = {
            1: Installation(1, "Codertocat"),
            4242: Installation(4242, None),
        }
        self.tokens: dict[str, tuple[int, float]] = {}
        self.user_tokens: dict[str, str] = {}  # a user's plain token -> the user's login
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.statuses: dict[str, list[dict[str, Any]]] = {}  # "owner/repo@sha" -> statuses
        self.comments: dict[int, dict[str, Any]] = {}
        self.deployments: dict[int, dict[str, Any]] = {}
        self.deployment_statuses: dict[int, list[dict[str, Any]]] = {}
        self.check_runs: dict[int, dict[str, Any]] = {}
        self.rate_remaining = 5000
        self.pulls: dict[str, dict[int, dict[str, Any]]] = {}  # repository (lower case) -> number -> PR
        self.deliveries: list[dict[str, Any]] = []  # the App's hook deliveries, oldest first
        self.redelivery_status = 202  # what a redelivered attempt gets from the webhook
        self.pull_faults: dict[tuple[str, int], tuple[int, int]] = {}  # (repository, page) -> (status, count)
        # (repository, login), lower case -> GitHub's legacy permission and the role's name; anyone
        # else reads (the repositories here are public).
        self.collaborators: dict[tuple[str, str], tuple[str, str]] = {}
        self._ids = itertools.count(1000)
        self._lock = threading.Lock()
        self.port = 0
        self._templates = {
            "token": recorded("GithubIntegration.testGetAccessToken")[2],
            "bad_jwt": recorded("GithubIntegration.testGetAccessTokenWithExpiredJWT")[2],
            "no_installation": recorded("GithubIntegration.testGetAccessTokenForNoInstallation")[2],
            "status": recorded("Commit.testCreateStatusWithAllParameters")[2],
            "comment": recorded("Issue.testCreateComment")[2],
            "deployment": recorded("Repository.testCreateDeployment")[2],
            "deployment_status": recorded("DeploymentStatus.testCreate")[2],
            "rate_limited": recorded("SpecificExceptions.testAuthenticatedRateLimitExceeded", 1),
            "installation": recorded("GithubIntegration.testGetRepoInstallation")[2],
            "installation_not_found": recorded("GithubIntegration.testGetInstallationNotFound")[2],
            "installation_repositories": recorded("Installation.testGetRepos", 1)[2],
            "user": recorded("SpecificExceptions.testRateLimitExceeded")[2],
            "hook_delivery": recorded("Repository.testGetHookDeliveries")[2][0]
            if recorded("Repository.testGetHookDeliveries")[2]
            else {},
            "hook_delivery_detail": recorded("Repository.testGetHookDelivery")[2],
            "check_run": recorded("CheckRun.testCreateCheckRunInProgress")[2],
            "check_runs": recorded("CheckRun.testGetCheckRunsForRef")[2],
            "collaborator_permission": recorded("Repository.testCollaboratorRoleName")[2],
        }
        self._pull_template: dict[str, Any] = {
            **(recorded("Repository.testGetPulls")[2] or [{}])[0],
            **recorded("PullRequest.setUp", 1)[2],
        }

    # What tests look at -------------------------------------------------------------------------------

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method and re.fullmatch(pattern, c.path) and c.status < 300]

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def installation(
        self,
        installation_id: int,
        account: str,
        repositories: set[str] | None = None,
        permissions: dict[str, str] | None = None,
    ) -> None:
        """Install the App on `account`: on all its repositories, or on `repositories` only (with the
        App's permissions, or `permissions` when given: an App whose settings grant less)."""
        granted = dict(APP_PERMISSIONS) if permissions is None else dict(permissions)
        with self._lock:
            self.installations[installation_id] = Installation(
                installation_id, account, repositories, permissions=granted
            )

    def expire_tokens(self, installation_id: int) -> None:
        """Expire the installation's tokens now (GitHub's expire after an hour): a client that holds
        one gets 401 Bad credentials until it asks for a new one."""
        with self._lock:
            for token, (installation, _) in list(self.tokens.items()):
                if installation == installation_id:
                    self.tokens[token] = (installation, 0.0)

    def installation_of(self, repository: str) -> Installation | None:
        """The App's installation on `repository`, as GitHub answers `GET /repos/{owner}/{repo}/installation`:
        the one on the repository's account (at most one per account), else the catch-all."""
        owner = repository.split("/")[0].lower()
        installations = list(self.installations.values())  # a copy: tests add installations from their thread
        on_account = [i for i in installations if i.account is not None and i.account.lower() == owner]
        candidates = on_account or [i for i in installations if i.account is None]
        return next((i for i in candidates if i.could_cover(repository)), None)

    def covers(self, installation_id: int, repository: str) -> bool:
        """Whether the installation's token may reach `repository`."""
        found = self.installation_of(repository)
        return found is not None and found.id == installation_id

    def collaborator(self, repository: str, login: str, role: str) -> None:
        """Give `login` a role on `repository` (admin, maintain, write, triage, read), as GitHub reports
        it: `permission` is the legacy level (maintain reads as write, triage as read)."""
        permission = {"maintain": "write", "triage": "read"}.get(role, role)
        with self._lock:
            self.collaborators[(repository.lower(), login.lower())] = (permission, role)

    def user_token(self, login: str) -> str:
        """A plain token of the user `login` (one that never expires, as a personal access token may)."""
        token = "ghp_" + secrets.token_hex(18)
        with self._lock:
            self.user_tokens[token] = login
        return token

    def secondary_rate_limit(
        self, path: str = r"/repos/.*", method: str = ".*", count: int = 1, request_body: str | None = None
    ) -> None:
        """A secondary rate limit as GitHub answers it when it names no wait: the recorded 403 (whose
        documentation link and message say what it is) without its Retry-After header."""
        status, _recorded_headers, body = self._templates["rate_limited"]
        self.inject(
            Fault(
                method=method,
                path=path,
                status=status,
                body={**body, "documentation_url": SECONDARY_RATE_LIMIT_DOCS, "message": SECONDARY_RATE_LIMIT_MESSAGE},
                count=count,
                request_body=request_body,
            )
        )

    def rate_limit(self, path: str = r"/repos/.*", retry_after: int = 1, count: int = 1) -> None:
        """A secondary rate limit as GitHub answers it: 403, a message, and Retry-After."""
        status, _recorded_headers, body = self._templates["rate_limited"]
        self.inject(
            Fault(
                path=path,
                status=status,
                headers={"Retry-After": str(retry_after)},
                body={**body, "message": "You have exceeded a secondary rate limit."},
                count=count,
            )
        )

    # Plumbing --------------------------------------------------------------------------------------

    def _next_id(self) -> int:
        return next(self._ids)

    def _headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": "5000",
            "X-RateLimit-Remaining": str(self.rate_remaining),
            "X-RateLimit-Reset": str(int(time.time()) + 3600),
            "X-RateLimit-Used": str(5000 - self.rate_remaining),
            "X-RateLimit-Resource": "core",
            "X-GitHub-Media-Type": "github.v3; format=json",
        }

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(body, status=status, headers={**self._headers(), **(headers or {})})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body: Any = None
        raw = b""
        if request.can_read_body:
            raw = await request.read()
            body = json.loads(raw) if raw else None
        request[JSON_BODY] = body
        installation, user = None, None
        fault = None
        with self._lock:
            for candidate in self.faults:
                if candidate.matches(request.method, request.path, raw.decode(errors="replace")):
                    candidate.count -= 1
                    fault = candidate
                    break
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.status is not None:
            response = self._answer(fault.status, fault.body, fault.headers)
        elif request.path.startswith("/_"):
            response = await handler(request)
        elif JWT_PATH.fullmatch(request.path):
            refusal = self._check_jwt(request)
            response = refusal if refusal is not None else await handler(request)
        else:
            (installation, user), refusal = self._check_token(request)
            request[CALLER] = (installation, user)
            response = refusal if refusal is not None else await handler(request)
        with self._lock:
            if not request.path.startswith("/_"):
                self.rate_remaining = max(0, self.rate_remaining - 1)
                call = Call(request.method, request.path, body, installation, response.status, time.time(), user)
                self.calls.append(call)
        return response

    def _check_token(self, request: web.Request) -> tuple[tuple[int | None, str | None], web.Response | None]:
        """Who the token is, or the refusal: a bad or expired token (401), or an installation token
        used on a repository that its installation does not cover (403, as GitHub answers)."""
        header = request.headers.get("Authorization", "")
        token = header.split(" ", 1)[1] if " " in header else ""
        if token in self.user_tokens:
            return (None, self.user_tokens[token]), None
        entry = self.tokens.get(token)
        if entry is None or entry[1] < time.time():
            body = {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}
            return (None, None), self._answer(401, body)
        repo = REPO_PATH.fullmatch(request.path)
        if repo is not None and not self.covers(entry[0], f"{repo['owner']}/{repo['repo']}"):
            body = {
                "message": "Resource not accessible by integration",
                "documentation_url": "https://docs.github.com/rest",
            }
            return (entry[0], None), self._answer(403, body)
        return (entry[0], None), None

    def _check_jwt(self, request: web.Request) -> web.Response | None:
        """The refusal of a request whose App JWT is missing, expired or not the App's; None if it is good."""
        header = request.headers.get("Authorization", "")
        try:
            claims = jwt.decode(
                header.removeprefix("Bearer "),
                self.public_key,
                algorithms=["RS256"],
                options={"require": ["exp", "iat", "iss"]},
            )
            if str(claims["iss"]) != str(self.app_id):
                raise jwt.InvalidIssuerError("wrong issuer")
        except jwt.PyJWTError:
            return self._answer(401, self._templates["bad_jwt"])
        return None

    # GitHub App -------------------------------------------------------------------------------------

    async def access_token(self, request: web.Request) -> web.Response:
        installation = int(request.match_info["id"])
        if installation not in self.installations:
            return self._answer(404, self._templates["no_installation"])
        token = "ghs_" + secrets.token_hex(18)
        expires = time.time() + self.token_ttl
        self.tokens[token] = (installation, expires)
        body = copy.deepcopy(self._templates["token"])
        body.update(token=token, expires_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)))
        body["permissions"] = dict(self.installations[installation].permissions)
        body["repository_selection"] = "all" if self.installations[installation].repositories is None else "selected"
        return self._answer(201, body)

    def _installation_json(self, installation: Installation) -> dict[str, Any]:
        body: dict[str, Any] = copy.deepcopy(self._templates["installation"])
        account = installation.account or "octo"
        selection = "all" if installation.repositories is None else "selected"
        body.update(
            id=installation.id,
            app_id=self.app_id,
            app_slug=self.app_slug,
            repository_selection=selection,
            suspended_at=installation.suspended_at,
            access_tokens_url=self.url(f"/app/installations/{installation.id}/access_tokens"),
            repositories_url=self.url("/installation/repositories"),
            permissions={**installation.permissions, "metadata": "read"},
        )
        body["account"] = {**body.get("account", {}), "login": account, "url": self.url(f"/users/{account}")}
        return body

    async def repo_installation(self, request: web.Request) -> web.Response:
        """`GET /repos/{owner}/{repo}/installation` (App JWT): the App's installation on it, or 404."""
        installation = self.installation_of(self._repo(request))
        if installation is None:
            return self._answer(404, self._templates["installation_not_found"])
        return self._answer(200, self._installation_json(installation))

    async def app_installation(self, request: web.Request) -> web.Response:
        installation = self.installations.get(int(request.match_info["id"]))
        if installation is None:
            return self._answer(404, self._templates["installation_not_found"])
        return self._answer(200, self._installation_json(installation))

    async def app_installations(self, _: web.Request) -> web.Response:
        with self._lock:
            found = [self._installation_json(i) for i in self.installations.values()]
        return self._answer(200, found)

    async def installation_repositories(self, request: web.Request) -> web.Response:
        """`GET /installation/repositories` (installation token): the repositories it covers, of those
        this server has seen (an installation on all of an account's repositories cannot list the rest)."""
        installation_id = request[CALLER][0]
        installation = self.installations.get(installation_id) if installation_id is not None else None
        if installation is None:
            message = {"message": "You must authenticate with an installation access token", "documentation_url": ""}
            return self._answer(403, message)
        body = copy.deepcopy(self._templates["installation_repositories"])
        template = (body.get("repositories") or [{}])[0]
        with self._lock:
            known = {f"{m['owner']}/{m['repo']}" for c in self.calls if (m := REPO_PATH.fullmatch(c.path))}
            known |= {pr["base"]["repo"]["full_name"] for pulls in self.pulls.values() for pr in pulls.values()}
        names = sorted(installation.repositories if installation.repositories is not None else known)
        repositories = [
            {**template, "name": n.split("/")[1], "full_name": n, "url": self.url(f"/repos/{n}")}
            for n in names
            if self.covers(installation.id, n)
        ]
        body.update(
            total_count=len(repositories),
            repository_selection="all" if installation.repositories is None else "selected",
            repositories=repositories,
        )
        return self._answer(200, body)

    async def authenticated_user(self, request: web.Request) -> web.Response:
        """`GET /user`: the token's user; an installation token has none (403, as GitHub answers)."""
        login = request[CALLER][1]
        if login is None:
            message = {"message": "Resource not accessible by integration", "documentation_url": ""}
            return self._answer(403, message)
        return self._answer(200, self._user_json(login))

    def _user_json(self, login: str) -> dict[str, Any]:
        body: dict[str, Any] = copy.deepcopy(self._templates["user"])
        body.update(login=login, id=zlib.crc32(login.encode()), url=self.url(f"/users/{login}"), type="User")
        return body

    def _author(self, request: web.Request) -> dict[str, Any]:
        """`user` and `performed_via_github_app` of what the caller writes: the App's bot user and the App
        for an installation token, the user for a user's token."""
        login = request[CALLER][1]
        if login is not None:
            return {"user": self._user_json(login), "performed_via_github_app": None}
        bot = f"{self.app_slug}[bot]"
        user = {**self._user_json(bot), "type": "Bot", "id": 10**8 + self.app_id}
        return {"user": user, "performed_via_github_app": self._app_json()}

    def _app_json(self) -> dict[str, Any]:
        return {
            "id": self.app_id,
            "slug": self.app_slug,
            "node_id": f"A_{self.app_id}",
            "name": self.app_slug,
            "owner": self._user_json("octo"),
            "description": "Preview environments",
            "external_url": "https://example.com",
            "html_url": f"https://github.com/apps/{self.app_slug}",
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "permissions": dict(APP_PERMISSIONS),
            "events": ["pull_request"],
        }

    # Repositories ----------------------------------------------------------------------------------

    def _repo(self, request: web.Request) -> str:
        return f"{request.match_info['owner']}/{request.match_info['repo']}"

    async def get_repo(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        return self._answer(
            200, {"id": 1, "name": repo.split("/")[1], "full_name": repo, "url": self.url(request.path)}
        )

    async def create_status(self, request: web.Request) -> web.Response:
        data = request[JSON_BODY] or {}
        if data.get("state") not in ("error", "failure", "pending", "success"):
            return self._answer(422, {"message": "Validation Failed"})
        body = copy.deepcopy(self._templates["status"])
        sid = self._next_id()
        body.update(
            id=sid,
            state=data["state"],
            description=data.get("description"),
            target_url=data.get("target_url"),
            context=data.get("context", "default"),
            url=self.url(f"{request.path}/{sid}"),
        )
        key = f"{self._repo(request)}@{request.match_info['sha']}"
        self.statuses.setdefault(key, []).append(body)
        return self._answer(201, body)

    async def list_statuses(self, request: web.Request) -> web.Response:
        key = f"{self._repo(request)}@{request.match_info['sha']}"
        return self._answer(200, list(reversed(self.statuses.get(key, []))))  # newest first, as GitHub

    async def get_commit(self, request: web.Request) -> web.Response:
        sha = request.match_info["sha"]
        return self._answer(200, {"sha": sha, "url": self.url(request.path)})

    async def get_issue(self, request: web.Request) -> web.Response:
        number = int(request.match_info["number"])
        return self._answer(200, {"number": number, "id": number, "url": self.url(request.path), "state": "open"})

    def _comment_json(self, comment_id: int) -> dict[str, Any]:
        return self.comments[comment_id]

    async def list_comments(self, request: web.Request) -> web.Response:
        issue_url = self.url(request.path.rsplit("/comments", 1)[0])
        found = [c for c in self.comments.values() if c["issue_url"] == issue_url]
        return self._answer(200, found)

    async def create_comment(self, request: web.Request) -> web.Response:
        data = request[JSON_BODY] or {}
        cid = self._next_id()
        base = request.path.split("/issues/")[0]
        body = copy.deepcopy(self._templates["comment"])
        body.update(
            id=cid,
            body=data.get("body", ""),
            url=self.url(f"{base}/issues/comments/{cid}"),
            issue_url=self.url(request.path.rsplit("/comments", 1)[0]),
            edits=0,
            **self._author(request),
        )
        self.comments[cid] = body
        return self._answer(201, body)

    async def delete_comment(self, request: web.Request) -> web.Response:
        """Someone with access to the repository deletes a comment (anyone's, as maintainers may)."""
        if self.comments.pop(int(request.match_info["id"]), None) is None:
            return self._answer(404, {"message": "Not Found"})
        return web.Response(status=204, headers=self._headers())

    async def get_comment(self, request: web.Request) -> web.Response:
        comment = self.comments.get(int(request.match_info["id"]))
        return self._answer(200, comment) if comment else self._answer(404, {"message": "Not Found"})

    async def edit_comment(self, request: web.Request) -> web.Response:
        comment = self.comments.get(int(request.match_info["id"]))
        if comment is None:
            return self._answer(404, {"message": "Not Found"})
        comment["body"] = (request[JSON_BODY] or {}).get("body", comment["body"])
        comment["edits"] += 1
        return self._answer(200, comment)

    async def create_deployment(self, request: web.Request) -> web.Response:
        data = request[JSON_BODY] or {}
        did = self._next_id()
        body = copy.deepcopy(self._templates["deployment"])
        body.update(
            id=did,
            sha=data.get("ref"),
            ref=data.get("ref"),
            environment=data.get("environment"),
            original_environment=data.get("environment"),
            description=data.get("description"),
            transient_environment=data.get("transient_environment", False),
            production_environment=data.get("production_environment", False),
            url=self.url(f"{request.path}/{did}"),
            statuses_url=self.url(f"{request.path}/{did}/statuses"),
            repository=self._repo(request),
        )
        self.deployments[did] = body
        self.deployment_statuses[did] = []
        return self._answer(201, body)

    async def list_deployments(self, request: web.Request) -> web.Response:
        sha, environment = request.query.get("sha"), request.query.get("environment")
        found = [
            d
            for d in reversed(self.deployments.values())  # newest first, as GitHub
            if d["repository"] == self._repo(request)
            and (sha is None or d["sha"] == sha)
            and (environment is None or d["environment"] == environment)
        ]
        return self._answer(200, found)

    async def list_deployment_statuses(self, request: web.Request) -> web.Response:
        did = int(request.match_info["id"])
        if did not in self.deployments:
            return self._answer(404, {"message": "Not Found"})
        return self._answer(200, list(reversed(self.deployment_statuses[did])))

    async def get_deployment(self, request: web.Request) -> web.Response:
        deployment = self.deployments.get(int(request.match_info["id"]))
        return self._answer(200, deployment) if deployment else self._answer(404, {"message": "Not Found"})

    async def create_deployment_status(self, request: web.Request) -> web.Response:
        did = int(request.match_info["id"])
        if did not in self.deployments:
            return self._answer(404, {"message": "Not Found"})
        data = request[JSON_BODY] or {}
        body = copy.deepcopy(self._templates["deployment_status"])
        body.update(
            id=self._next_id(),
            state=data.get("state"),
            description=data.get("description"),
            environment_url=data.get("environment_url", ""),
            deployment_url=self.url(request.path.rsplit("/statuses", 1)[0]),
        )
        self.deployment_statuses[did].append(body)
        return self._answer(201, body)

    async def collaborator_permission(self, request: web.Request) -> web.Response:
        """`GET /repos/{owner}/{repo}/collaborators/{username}/permission`: the user's permission and
        role (Repository.testCollaboratorRoleName); `read` for anyone not made a collaborator."""
        login = request.match_info["username"]
        with self._lock:
            permission, role = self.collaborators.get((self._repo(request).lower(), login.lower()), ("read", "read"))
        body = copy.deepcopy(self._templates["collaborator_permission"])
        body["user"] = {**(body.get("user") or {}), **self._user_json(login)}
        body.update(permission=permission, role_name=role)
        return self._answer(200, body)

    # Backstop: pull requests and the App's hook deliveries -----------------------------------------
    # Shaped from Repository.testGetPulls (a listing's items), PullRequest.setUp (one PR), Issue131
    # .testGetPullsWithOrgHeadUser (Link-header paging) and Repository.testGetHookDeliveries/Delivery.

    def pull_request(
        self,
        repository: str,
        number: int,
        *,
        sha: str,
        ref: str = "feature",
        author: str = "octocat",
        title: str = "A change",
        draft: bool = False,
        updated_at: str | None = None,
        labels: tuple[str, ...] = (),
        head_repository: str | None = None,
    ) -> dict[str, Any]:
        """Open (or reopen, or push to) a PR on this server: it is listed until `close_pull`. Its head is
        in `head_repository` (a fork) when given, else in the repository itself."""
        stamp = updated_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._lock:
            pulls = self.pulls.setdefault(repository.lower(), {})
            pr = pulls.get(number) or copy.deepcopy(self._pull_template)
            pr.update(
                number=number,
                id=10**6 + number,
                node_id=f"PR_{zlib.crc32(f'{repository}#{number}'.encode())}",
                state="open",
                title=title,
                draft=draft,
                merged=False,
                merged_at=None,
                closed_at=None,
                created_at=pr.get("created_at") if number in pulls else stamp,
                updated_at=stamp,
                url=self.url(f"/repos/{repository}/pulls/{number}"),
                html_url=f"https://github.com/{repository}/pull/{number}",
            )
            pr["user"] = {
                **(pr.get("user") or {}),
                "login": author,
                "type": "Bot" if author.endswith("[bot]") else "User",
            }
            repo = {
                **((pr.get("base") or {}).get("repo") or {}),
                "full_name": repository,
                "name": repository.split("/")[1],
            }
            head = repo if head_repository is None else {**repo, "full_name": head_repository, "fork": True}
            pr["head"] = {
                **pr["head"],
                "sha": sha,
                "ref": ref,
                "label": f"{head['full_name'].split('/')[0]}:{ref}",
                "repo": head,
            }
            pr["labels"] = [{"id": zlib.crc32(name.encode()), "name": name, "default": False} for name in labels]
            pr["base"] = {**(pr.get("base") or {}), "repo": repo}
            pulls[number] = pr
            return copy.deepcopy(pr)

    def close_pull(
        self, repository: str, number: int, *, merged: bool = False, at: str | None = None
    ) -> dict[str, Any]:
        """Close (or merge) a PR: it leaves the open listing, and `GET .../pulls/{number}` says closed."""
        stamp = at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._lock:
            pr = self.pulls[repository.lower()][number]
            pr.update(
                state="closed", closed_at=stamp, updated_at=stamp, merged=merged, merged_at=stamp if merged else None
            )
            return copy.deepcopy(pr)

    def hook_delivery(self, guid: str, status_code: int, *, event: str = "pull_request", action: str = "opened") -> int:
        """A delivery of the App's webhook as GitHub lists it; its id."""
        with self._lock:
            delivery_id = self._next_id()
            status = "OK" if 200 <= status_code <= 299 else f"Invalid HTTP Response: {status_code}"
            self.deliveries.append(
                {
                    **self._templates["hook_delivery"],
                    "id": delivery_id,
                    "guid": guid,
                    "delivered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "redelivery": any(d["guid"] == guid for d in self.deliveries),
                    "status": status,
                    "status_code": status_code,
                    "event": event,
                    "action": action,
                    "url": "",
                }
            )
            return delivery_id

    def _page(self, request: web.Request, items: list[Any], per_page: int = 30) -> tuple[list[Any], dict[str, str]]:
        """One page of `items` and its Link header, as GitHub pages lists (`page` and `per_page`)."""
        per_page = max(1, min(100, int(request.query.get("per_page", per_page))))
        page = max(1, int(request.query.get("page", 1)))
        last = max(1, -(-len(items) // per_page))
        links = []
        if page < last:
            query = {**request.query, "page": str(page + 1), "per_page": str(per_page)}
            links.append(f'<{self.url(request.path)}?{urllib.parse.urlencode(query)}>; rel="next"')
            query = {**request.query, "page": str(last), "per_page": str(per_page)}
            links.append(f'<{self.url(request.path)}?{urllib.parse.urlencode(query)}>; rel="last"')
        return items[(page - 1) * per_page : page * per_page], ({"Link": ", ".join(links)} if links else {})

    def pull_listing_fault(self, repository: str, page: int, status: int, count: int = 1) -> None:
        """The next `count` listings of `repository`'s PRs answer page `page` with `status`; 200 is an
        empty page (no PRs, no Link to more), as a listing cut short by a flaky proxy or cache would be."""
        with self._lock:
            self.pull_faults[(repository.lower(), page)] = (status, count)

    async def list_pulls(self, request: web.Request) -> web.Response:
        state = request.query.get("state", "open")
        key = (self._repo(request).lower(), max(1, int(request.query.get("page", 1))))
        with self._lock:
            status, count = self.pull_faults.get(key, (0, 0))
            if count:
                self.pull_faults[key] = (status, count - 1)
        if count and status == 200:
            return self._answer(200, [])
        if count:
            return self._answer(status, {"message": "Server Error"})
        with self._lock:
            pulls = sorted(self.pulls.get(self._repo(request).lower(), {}).values(), key=lambda pr: pr["number"])
            found = [copy.deepcopy(pr) for pr in pulls if state == "all" or pr["state"] == state]
        page, headers = self._page(request, found)
        return self._answer(200, page, headers)

    async def get_pull(self, request: web.Request) -> web.Response:
        with self._lock:
            pr = self.pulls.get(self._repo(request).lower(), {}).get(int(request.match_info["number"]))
            found = copy.deepcopy(pr) if pr is not None else None
        return self._answer(200, found) if found is not None else self._answer(404, {"message": "Not Found"})

    async def list_hook_deliveries(self, request: web.Request) -> web.Response:
        """Newest first, paged by an opaque `cursor` (GitHub's cursor paging of deliveries)."""
        per_page = max(1, min(100, int(request.query.get("per_page", 30))))
        start = int(request.query.get("cursor", "0") or 0)
        with self._lock:
            newest_first = list(reversed(self.deliveries))
        page = newest_first[start : start + per_page]
        headers = {}
        if start + per_page < len(newest_first):
            query = {"per_page": str(per_page), "cursor": str(start + per_page)}
            headers["Link"] = f'<{self.url(request.path)}?{urllib.parse.urlencode(query)}>; rel="next"'
        return self._answer(200, page, headers)

    async def get_hook_delivery(self, request: web.Request) -> web.Response:
        delivery_id = int(request.match_info["id"])
        with self._lock:
            found = next((d for d in self.deliveries if d["id"] == delivery_id), None)
        if found is None:
            return self._answer(404, {"message": "Not Found"})
        recorded_body = self._templates["hook_delivery_detail"]
        return self._answer(200, {**recorded_body, **found})

    async def redeliver(self, request: web.Request) -> web.Response:
        """`POST /app/hook/deliveries/{id}/attempts`: a new attempt of that delivery, answered by
        `redelivery_status` (what the webhook would answer now)."""
        delivery_id = int(request.match_info["id"])
        with self._lock:
            found = next((d for d in self.deliveries if d["id"] == delivery_id), None)
        if found is None:
            return self._answer(404, {"message": "Not Found"})
        self.hook_delivery(found["guid"], self.redelivery_status, event=found["event"], action=found["action"])
        return self._answer(202, {})

    def _backstop_routes(self, app: web.Application) -> None:
        repo = "/repos/{owner}/{repo}"
        app.router.add_get(repo + "/pulls", self.list_pulls)
        app.router.add_get(repo + "/pulls/{number:\\d+}", self.get_pull)
        app.router.add_get("/app/hook/deliveries", self.list_hook_deliveries)
        app.router.add_get("/app/hook/deliveries/{id:\\d+}", self.get_hook_delivery)
        app.router.add_post("/app/hook/deliveries/{id:\\d+}/attempts", self.redeliver)

    # Check runs (the Checks API answers GitHub Apps only) -------------------------------------------------

    def _checks_refusal(self, request: web.Request) -> web.Response | None:
        """GitHub's 403 for a check-run call by a user's token, or by an installation whose App lacks
        `checks: write`; None when the caller may."""
        installation_id, login = request[CALLER]
        docs = "https://docs.github.com/rest/checks/runs"
        if login is not None:
            return self._answer(403, {"message": "You must authenticate via a GitHub App.", "documentation_url": docs})
        installation = self.installations.get(installation_id) if installation_id is not None else None
        if installation is None or installation.permissions.get("checks") != "write":
            return self._answer(403, {"message": "Resource not accessible by integration", "documentation_url": docs})
        return None

    @staticmethod
    def _check_run_invalid(data: dict[str, Any], creating: bool) -> str | None:
        """Why GitHub would answer 422 to this check run's fields, or None."""
        if creating and not (isinstance(data.get("name"), str) and data["name"]):
            return "name is missing"
        if creating and not re.fullmatch(r"[0-9a-f]{40}", str(data.get("head_sha", ""))):
            return "head_sha is not a commit"
        if "status" in data and data["status"] not in CHECK_RUN_STATUSES:
            return f"status {data['status']!r} is not one of {CHECK_RUN_STATUSES}"
        if "conclusion" in data and data["conclusion"] not in CHECK_RUN_CONCLUSIONS:
            return f"conclusion {data['conclusion']!r} is not one of {CHECK_RUN_CONCLUSIONS}"
        if data.get("status") == "completed" and "conclusion" not in data:
            return "conclusion is required when status is completed"
        output = data.get("output")
        if output is not None:
            if not isinstance(output.get("title"), str) or not isinstance(output.get("summary"), str):
                return "output needs a title and a summary"
            if len(output["summary"]) > 65535 or len(output.get("text") or "") > 65535:
                return "output.summary and output.text are at most 65535 characters"
        details = data.get("details_url")
        if details is not None and not re.match(r"https?://", str(details)):
            return "details_url is not a URL"
        return None

    def _apply_check_run(self, run: dict[str, Any], data: dict[str, Any]) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for key in ("name", "details_url", "external_id"):
            if key in data:
                run[key] = data[key]
        if "conclusion" in data:  # as GitHub: a conclusion completes the run
            run.update(status="completed", conclusion=data["conclusion"], completed_at=now)
        elif data.get("status") in ("queued", "in_progress"):
            run.update(status=data["status"], conclusion=None, completed_at=None)
        if "output" in data:
            output = data["output"]
            run["output"] = {
                **run["output"],
                "title": output["title"],
                "summary": output["summary"],
                "text": output.get("text"),
            }
        run["edits"] = run.get("edits", -1) + 1

    async def create_check_run(self, request: web.Request) -> web.Response:
        refusal = self._checks_refusal(request)
        if refusal is not None:
            return refusal
        data = request[JSON_BODY] or {}
        invalid = self._check_run_invalid(data, creating=True)
        if invalid is not None:
            return self._answer(422, {"message": "Validation Failed", "errors": [invalid]})
        rid = self._next_id()
        repo = self._repo(request)
        body = copy.deepcopy(self._templates["check_run"])
        body.update(
            id=rid,
            node_id=f"CR_{rid}",
            head_sha=data["head_sha"],
            external_id=data.get("external_id", ""),
            url=self.url(f"/repos/{repo}/check-runs/{rid}"),
            html_url=f"https://github.com/{repo}/runs/{rid}",
            details_url=None,
            status="queued",
            conclusion=None,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            completed_at=None,
            output={
                "title": None,
                "summary": None,
                "text": None,
                "annotations_count": 0,
                "annotations_url": self.url(f"/repos/{repo}/check-runs/{rid}/annotations"),
            },
            app=self._app_json(),
            pull_requests=[],
            repository=repo,
            installation=request[CALLER][0],
        )
        self._apply_check_run(body, data)
        with self._lock:
            self.check_runs[rid] = body
        return self._answer(201, body)

    def _check_run_of(self, request: web.Request) -> dict[str, Any] | None:
        run = self.check_runs.get(int(request.match_info["id"]))
        return run if run is not None and run["repository"] == self._repo(request) else None

    async def get_check_run(self, request: web.Request) -> web.Response:
        refusal = self._checks_refusal(request)
        if refusal is not None:
            return refusal
        run = self._check_run_of(request)
        return self._answer(200, run) if run else self._answer(404, {"message": "Not Found"})

    async def update_check_run(self, request: web.Request) -> web.Response:
        refusal = self._checks_refusal(request)
        if refusal is not None:
            return refusal
        run = self._check_run_of(request)
        if run is None:
            return self._answer(404, {"message": "Not Found"})
        if run["app"]["id"] != self.app_id:  # only the App that made a check run may change it
            message = "Invalid app_id - check run can only be modified by the GitHub App that created it."
            return self._answer(403, {"message": message})
        data = request[JSON_BODY] or {}
        invalid = self._check_run_invalid(data, creating=False)
        if invalid is not None:
            return self._answer(422, {"message": "Validation Failed", "errors": [invalid]})
        self._apply_check_run(run, data)
        return self._answer(200, run)

    async def list_check_runs(self, request: web.Request) -> web.Response:
        """`GET /repos/{owner}/{repo}/commits/{ref}/check-runs`: newest first; `filter=latest` (the
        default) keeps the newest run of each name and App, `check_name` and `status` narrow it."""
        refusal = self._checks_refusal(request)
        if refusal is not None:
            return refusal
        query = request.query
        with self._lock:
            runs = sorted(self.check_runs.values(), key=lambda r: -int(r["id"]))
        found = [
            r
            for r in runs
            if r["repository"] == self._repo(request)
            and r["head_sha"] == request.match_info["sha"]
            and ("check_name" not in query or r["name"] == query["check_name"])
            and ("status" not in query or r["status"] == query["status"])
            and ("app_id" not in query or str(r["app"]["id"]) == query["app_id"])
        ]
        if query.get("filter", "latest") == "latest":
            seen: set[tuple[str, int]] = set()
            latest = []
            for run in found:
                if (run["name"], run["app"]["id"]) not in seen:
                    seen.add((run["name"], run["app"]["id"]))
                    latest.append(run)
            found = latest
        body = {**self._templates["check_runs"], "total_count": len(found), "check_runs": found}
        return self._answer(200, body)

    async def rate_limit_view(self, _: web.Request) -> web.Response:
        reset = int(time.time()) + 3600
        core = {"limit": 5000, "remaining": self.rate_remaining, "reset": reset, "used": 5000 - self.rate_remaining}
        return self._answer(200, {"resources": {"core": core}, "rate": core})

    async def dump_calls(self, _: web.Request) -> web.Response:
        with self._lock:
            calls = [c.__dict__ for c in self.calls]
        return web.json_response(calls)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware])
        repo = "/repos/{owner}/{repo}"
        app.router.add_post("/app/installations/{id}/access_tokens", self.access_token)
        app.router.add_get("/app/installations", self.app_installations)
        app.router.add_get("/app/installations/{id}", self.app_installation)
        app.router.add_get(repo + "/installation", self.repo_installation)
        app.router.add_get("/installation/repositories", self.installation_repositories)
        app.router.add_get("/user", self.authenticated_user)
        app.router.add_get(repo, self.get_repo)
        app.router.add_post(repo + "/statuses/{sha}", self.create_status)
        app.router.add_get(repo + "/commits/{sha}", self.get_commit)
        app.router.add_get(repo + "/commits/{sha}/statuses", self.list_statuses)
        app.router.add_get(repo + "/statuses/{sha}", self.list_statuses)  # the older path PyGithub reads
        app.router.add_get(repo + "/issues/{number:\\d+}", self.get_issue)
        app.router.add_get(repo + "/issues/{number:\\d+}/comments", self.list_comments)
        app.router.add_post(repo + "/issues/{number:\\d+}/comments", self.create_comment)
        app.router.add_get(repo + "/issues/comments/{id}", self.get_comment)
        app.router.add_patch(repo + "/issues/comments/{id}", self.edit_comment)
        app.router.add_delete(repo + "/issues/comments/{id}", self.delete_comment)
        app.router.add_post(repo + "/deployments", self.create_deployment)
        app.router.add_get(repo + "/deployments", self.list_deployments)
        app.router.add_get(repo + "/deployments/{id}", self.get_deployment)
        app.router.add_get(repo + "/deployments/{id}/statuses", self.list_deployment_statuses)
        app.router.add_post(repo + "/deployments/{id}/statuses", self.create_deployment_status)
        app.router.add_post(repo + "/check-runs", self.create_check_run)
        app.router.add_get(repo + "/check-runs/{id:\\d+}", self.get_check_run)
        app.router.add_patch(repo + "/check-runs/{id:\\d+}", self.update_check_run)
        app.router.add_get(repo + "/commits/{sha}/check-runs", self.list_check_runs)
        app.router.add_get(repo + "/collaborators/{username}/permission", self.collaborator_permission)
        app.router.add_get("/rate_limit", self.rate_limit_view)
        app.router.add_get("/_calls", self.dump_calls)
        self._backstop_routes(app)
        return app


class Server:
    """Runs a FakeGitHub on a loopback port in a background thread."""

    def __init__(self, fake: FakeGitHub, port: int = 0) -> None:
        self.fake = fake
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> FakeGitHub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self.fake

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.fake.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
        self.fake.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description="A local server that answers like GitHub's REST API.")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--key-file", type=Path, required=True, help="where to write the App's private key")
    args = parser.parse_args()
    fake = FakeGitHub()
    args.key_file.write_text(fake.private_key_pem)
    server = Server(fake, args.port)
    server.start()
    print(f"fake GitHub on http://127.0.0.1:{fake.port} (App id {fake.app_id})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
