"""can_write asks GitHub (the local server) who may write to a repository, and keeps the answer briefly."""

from __future__ import annotations

import uuid

import pytest
from github import Github, GithubException

from devtools.fakegithub import FakeGitHub, Fault
from ephemera.github.client import GitHubAuth
from ephemera.github.permissions import Permissions
from tests.test_github import INSTALLATION, app_settings


def repo() -> str:
    return f"octo-org/perm-{uuid.uuid4().hex[:8]}"


def clients(github: FakeGitHub) -> GitHubAuth:
    return GitHubAuth(app_settings(github))


@pytest.mark.parametrize(
    ("role", "writes"),
    [("admin", True), ("maintain", True), ("write", True), ("triage", False), ("read", False)],
)
def test_admin_maintain_and_write_can_write(github: FakeGitHub, role: str, writes: bool) -> None:
    auth, repository = clients(github), repo()
    github.collaborator(repository, "hubot", role)

    def client(_: str) -> Github:
        return auth.client_for(INSTALLATION)

    assert Permissions().can_write(client, repository, "hubot") is writes
    path = rf"/repos/{repository}/collaborators/hubot/permission"
    assert len(github.calls_to("GET", path)) == 1


def test_someone_who_is_no_collaborator_cannot_write(github: FakeGitHub) -> None:
    auth, repository = clients(github), repo()
    assert Permissions().can_write(lambda _: auth.client_for(INSTALLATION), repository, "stranger") is False


def test_a_user_github_does_not_know_cannot_write(github: FakeGitHub) -> None:
    auth, repository = clients(github), repo()
    github.inject(Fault(method="GET", path=rf"/repos/{repository}/collaborators/ghost/permission", status=404))
    assert Permissions().can_write(lambda _: auth.client_for(INSTALLATION), repository, "ghost") is False


def test_a_failure_is_no_answer(github: FakeGitHub) -> None:
    # A 5xx must not read as "cannot write" (nor as "can"): the caller fails, and GitHub redelivers.
    auth, repository = clients(github), repo()
    github.collaborator(repository, "hubot", "write")
    github.inject(Fault(method="GET", path=rf"/repos/{repository}/collaborators/hubot/permission", status=502))
    permissions = Permissions()
    with pytest.raises(GithubException):
        permissions.can_write(lambda _: auth.client_for(INSTALLATION), repository, "hubot")
    assert permissions.can_write(lambda _: auth.client_for(INSTALLATION), repository, "hubot") is True


def test_answers_are_kept_briefly(github: FakeGitHub) -> None:
    auth, repository = clients(github), repo()
    github.collaborator(repository, "hubot", "write")
    now = [1000.0]
    permissions = Permissions(ttl=60, clock=lambda: now[0])
    path = rf"/repos/{repository}/collaborators/hubot/permission"
    for login in ("hubot", "HUBOT", "hubot"):  # GitHub logins are case-insensitive
        assert permissions.can_write(lambda _: auth.client_for(INSTALLATION), repository, login) is True
    assert len(github.calls_to("GET", path)) == 1
    github.collaborator(repository, "hubot", "read")  # access taken away: seen once the answer expires
    now[0] += 61
    assert permissions.can_write(lambda _: auth.client_for(INSTALLATION), repository, "hubot") is False
    assert len(github.calls_to("GET", path)) == 2
