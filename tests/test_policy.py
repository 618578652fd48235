"""The policy's decision, rule by rule (pure: no cluster, no GitHub)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from devtools.support import fixture_payload
from ephemera.api.naming import KEEP_LABEL_ANNOTATION, PRIORITY_LABEL
from ephemera.config import Settings
from ephemera.intake.events import parse_pull_request
from ephemera.policy import (
    REFUSALS,
    Approval,
    Policy,
    PullRequestFacts,
    allowed,
    decide,
    for_repository,
    mirrored,
)

HEAD = "a" * 40
PR = PullRequestFacts(
    repository="octo-org/shop",
    number=7,
    draft=False,
    author="octocat",
    author_is_bot=False,
    fork=False,
    labels=frozenset(),
    head_sha=HEAD,
)
FORK = replace(PR, fork=True, labels=frozenset({"preview-approved"}))


def refusal(policy: Policy, facts: PullRequestFacts) -> str:
    decision = decide(policy, facts)
    assert not decision.admit, decision
    assert decision.code in REFUSALS
    return decision.code


def test_by_default_every_ordinary_pr_is_admitted() -> None:
    decision = decide(Policy(), PR)
    assert (decision.admit, decision.code) == (True, "admitted")


@pytest.mark.parametrize(
    ("allow", "repository", "admitted"),
    [
        ((), "anyone/anything", True),
        (("octo-org",), "Octo-Org/shop", True),
        (("octo-org/shop",), "octo-org/SHOP", True),
        (("octo-org/shop",), "octo-org/other", False),
        (("octo-org",), "octo-orga/shop", False),
        (("octo",), "octo-org/shop", False),
    ],
)
def test_the_allowlist_names_owners_and_repositories(allow: tuple[str, ...], repository: str, admitted: bool) -> None:
    assert allowed(allow, repository) is admitted
    policy = Policy(allow=tuple(a.lower() for a in allow))
    assert decide(policy, replace(PR, repository=repository)).admit is admitted


def test_bots_are_refused_by_login_and_optionally_by_type() -> None:
    for login in ("dependabot[bot]", "Renovate[bot]"):
        assert refusal(Policy(), replace(PR, author=login, author_is_bot=True)) == "bot_author"
    other_bot = replace(PR, author="mergify[bot]", author_is_bot=True)
    assert decide(Policy(), other_bot).admit
    assert refusal(Policy(skip_all_bots=True), other_bot) == "bot_author"
    assert refusal(Policy(bot_authors=frozenset({"mergify[bot]"})), other_bot) == "bot_author"
    assert decide(Policy(bot_authors=frozenset()), replace(PR, author="dependabot[bot]")).admit


def test_drafts_follow_the_setting() -> None:
    assert decide(Policy(), replace(PR, draft=True)).admit
    assert refusal(Policy(drafts=False), replace(PR, draft=True)) == "draft"


def test_opt_in_mode_needs_the_label() -> None:
    policy = Policy(opt_in=True)
    assert refusal(policy, PR) == "not_opted_in"
    assert decide(policy, replace(PR, labels=frozenset({"preview"}))).admit
    assert decide(replace(policy, opt_in_label="deploy-me"), replace(PR, labels=frozenset({"deploy-me"}))).admit


def test_a_fork_needs_a_writers_approval_of_its_head() -> None:
    policy = Policy()
    assert refusal(policy, FORK) == "fork_unapproved"
    writer = Approval("maintainer", HEAD, writer=True)
    assert decide(policy, replace(FORK, approval=writer)).admit
    # The label must still be on the PR: removing it withdraws the approval.
    assert refusal(policy, replace(FORK, labels=frozenset(), approval=writer)) == "fork_unapproved"
    # A labeller without write access, or the author (whatever their access), does not count.
    assert refusal(policy, replace(FORK, approval=Approval("visitor", HEAD, writer=False))) == "fork_unapproved"
    assert refusal(policy, replace(FORK, approval=Approval("OctoCat", HEAD, writer=True))) == "fork_unapproved"
    unknown = decide(policy, replace(FORK, approval=Approval("maintainer", HEAD, writer=None)))
    assert not unknown.admit
    assert "cannot be checked" in unknown.reason


def test_a_push_after_the_approval_needs_approval_again_unless_configured() -> None:
    pushed = replace(FORK, head_sha="b" * 40, approval=Approval("maintainer", HEAD, writer=True))
    assert refusal(Policy(), pushed) == "fork_push_unapproved"
    assert decide(Policy(reapprove_on_push=False), pushed).admit


def test_forks_can_be_allowed_or_denied_outright() -> None:
    assert decide(Policy(forks="allow"), replace(FORK, labels=frozenset())).admit
    writer = Approval("maintainer", HEAD, writer=True)
    assert refusal(Policy(forks="deny"), replace(FORK, approval=writer)) == "fork_denied"


def test_rules_are_judged_in_order() -> None:
    # A draft bot PR from a fork of a repository outside the allowlist: the allowlist speaks first.
    everything = replace(FORK, author="dependabot[bot]", draft=True, repository="evil/repo")
    assert refusal(Policy(allow=("octo-org",), drafts=False), everything) == "not_allowed"
    assert refusal(Policy(drafts=False), everything) == "bot_author"


def test_the_priority_and_keep_labels_are_mirrored() -> None:
    assert mirrored({"bug"}) == ({PRIORITY_LABEL: None}, {KEEP_LABEL_ANNOTATION: None})
    assert mirrored({"preview-priority", "preview-keep"}) == (
        {PRIORITY_LABEL: "true"},
        {KEEP_LABEL_ANNOTATION: "true"},
    )


def template(name: str, patterns: list[str], policy: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"repositories": patterns}
    if policy is not None:
        spec["policy"] = policy
    return {"metadata": {"name": name}, "spec": spec}


def test_the_matching_templates_policy_block_overrides_the_cluster() -> None:
    base = Policy(drafts=False)
    templates = [
        template("all", ["octo-org/*"], {"optIn": True}),
        template("shop", ["octo-org/shop"], {"drafts": True, "forks": "allow", "botAuthors": ["Ci-Bot"]}),
        template("plain", ["octo-org/plain"], None),
    ]
    shop = for_repository(base, templates, "Octo-Org/Shop")
    assert (shop.drafts, shop.forks, shop.bot_authors, shop.opt_in, shop.template) == (
        True,
        "allow",
        frozenset({"ci-bot"}),
        False,
        "shop",
    )
    assert for_repository(base, templates, "octo-org/web").opt_in is True
    assert for_repository(base, templates, "octo-org/plain") == base
    assert for_repository(base, templates, "elsewhere/x") == base


def test_an_ambiguous_or_invalid_template_leaves_the_cluster_policy() -> None:
    base = Policy()
    tie = [template("a", ["octo-org/*"], {"optIn": True}), template("b", ["octo-org/*"], {"drafts": False})]
    assert for_repository(base, tie, "octo-org/shop") == base
    invalid = [template("bad", ["octo-org/shop"], {"forks": "sometimes"})]
    assert for_repository(base, invalid, "octo-org/shop") == base


def test_the_cluster_policy_comes_from_the_settings() -> None:
    settings = Settings(
        policy_allow=["Octo-Org", "other/repo"],
        policy_bot_authors=["CI[bot]"],
        policy_opt_in=True,
        policy_forks="deny",
        policy_reapprove_on_push=False,
        webhook_draft_prs=False,
    )
    policy = Policy.from_settings(settings)
    assert policy.allow == ("octo-org", "other/repo")
    assert policy.bot_authors == frozenset({"ci[bot]"})
    assert (policy.opt_in, policy.forks, policy.reapprove_on_push, policy.drafts) == (True, "deny", False, False)
    assert Policy.from_settings(Settings()) == Policy()


def test_an_allowlist_entry_must_be_an_owner_or_a_repository() -> None:
    with pytest.raises(ValueError, match="EPHEMERA_POLICY_ALLOW"):
        Settings(policy_allow=["octo-org/shop/extra"])


def test_a_label_event_from_an_apps_bot_with_a_long_slug_is_accepted() -> None:
    """The sender is parsed now (who applied a label); a bot's login may pass a person's 39 characters."""
    data = fixture_payload("pull_request", "labeled.payload.json")
    data["sender"]["login"] = "octo-org-release-automation-assistant[bot]"
    event = parse_pull_request(data)
    assert event.sender is not None
    assert event.sender.login == "octo-org-release-automation-assistant[bot]"
    assert not event.fork
    assert event.labels == frozenset({"bug"})
