"""Who may approve: a user's permission on a repository, as GitHub answers it.

The policy lets a fork's PR have a preview only once someone who can write to the repository
applied the approval label, and wakes an expired environment only for a writer's comment. GitHub's
`GET /repos/{owner}/{repo}/collaborators/{username}/permission` says it: `permission` is `admin`,
`write` (which `maintain` and custom roles built on write report too), `read` or `none`, and
`role_name` the role itself.

Answers are kept briefly (CACHE_TTL), so that a burst of labels on one repository asks once per
person; a writer whose access is taken away keeps it here for at most that long.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable

from github import Github, GithubException

WRITE_PERMISSIONS = frozenset({"admin", "maintain", "write"})
CACHE_TTL = 60.0
# Answers remembered at most (expired ones are dropped past it).
CACHE_SIZE = 4096


class Permissions:
    """`can_write` with its own cache; thread-safe (the webhook's intake runs in worker threads)."""

    def __init__(self, ttl: float = CACHE_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._answers: dict[tuple[str, str], tuple[bool, float]] = {}

    def can_write(self, github_for_repo: Callable[[str], Github], repository: str, login: str) -> bool:
        """Whether `login` has admin, maintain or write permission on `repository` (`owner/name`).

        A user GitHub does not know (404) cannot write. Any other failure (GitHub unreachable, a 5xx,
        a token that may not ask) raises: the caller must not take it for a "no" it would then act on.
        """
        key = (repository.lower(), login.lower())
        now = self.clock()
        with self._lock:
            cached = self._answers.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        client = github_for_repo(repository)
        path = f"/repos/{repository}/collaborators/{urllib.parse.quote(login, safe='')}/permission"
        try:
            # Through the requester, one request: PyGithub's get_collaborator_permission reads
            # `permission` only, and the role's name would need the same request again.
            _, answer = client.requester.requestJsonAndCheck("GET", path)
        except GithubException as err:
            if err.status != 404:
                raise
            answer = {}
        permission = str(answer.get("permission") or "none").lower()
        role = str(answer.get("role_name") or "").lower()
        allowed = permission in WRITE_PERMISSIONS or role in WRITE_PERMISSIONS
        with self._lock:
            if len(self._answers) >= CACHE_SIZE:
                self._answers = {k: v for k, v in self._answers.items() if v[1] > now}
            self._answers[key] = (allowed, now + self.ttl)
        return allowed


_DEFAULT = Permissions()


def can_write(github_for_repo: Callable[[str], Github], repository: str, login: str) -> bool:
    """Whether `login` may write to `repository` (admin, maintain or write), cached briefly (CACHE_TTL).

    `github_for_repo(repository)` gives a PyGithub client that may read the repository (an installation
    token of the App on it, or the plain token)."""
    return _DEFAULT.can_write(github_for_repo, repository, login)
