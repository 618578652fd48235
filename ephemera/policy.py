"""Which pull requests get a preview: the policy, and the one decision the webhook and the backstop share.

Pure: `decide(policy, facts)` says admit or refuse, with a reason for people and a code from a fixed set
(REFUSALS) for metrics. The policy is cluster-wide (EPHEMERA_POLICY_*, EPHEMERA_WEBHOOK_DRAFT_PRS) and
may be narrowed or widened per repository by a `policy` block on the PreviewTemplate that matches it
(`for_repository`). The rules, in the order they are judged:

1. the allowlist (owners and `owner/name`; empty: every repository the App is installed on);
2. bot authors (`dependabot[bot]`, `renovate[bot]` and whoever else the list names; optionally every
   account GitHub marks as a bot);
3. drafts (when drafts get no preview, `ready_for_review` creates it);
4. opt-in mode: only PRs labelled `preview`;
5. forks: a PR whose head is in another repository needs the approval label applied by someone with
   write access who is not its author (`Approval`), and, unless configured otherwise, again after
   every push from the fork.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from ephemera.api.naming import KEEP_LABEL_ANNOTATION, PRIORITY_LABEL
from ephemera.config import Settings
from ephemera.templates import ForkMode, RepositoryPolicy, specificity

# The PR labels the webhook mirrors onto the object (contract with the queue and the expiry).
PRIORITY_PR_LABEL = "preview-priority"
KEEP_PR_LABEL = "preview-keep"
DEFAULT_BOT_AUTHORS = ("dependabot[bot]", "renovate[bot]")
# Every refusal's code: the metric's label values, never anything a caller sends.
REFUSALS = (
    "not_allowed",
    "bot_author",
    "draft",
    "not_opted_in",
    "fork_denied",
    "fork_unapproved",
    "fork_push_unapproved",
)
ADMITTED = "admitted"


@dataclass(frozen=True)
class Policy:
    """The policy one repository's PRs are judged by."""

    allow: tuple[str, ...] = ()  # owners and owner/name, lower case; empty: all
    drafts: bool = True
    bot_authors: frozenset[str] = frozenset(DEFAULT_BOT_AUTHORS)  # lower case
    skip_all_bots: bool = False
    opt_in: bool = False
    opt_in_label: str = "preview"
    forks: ForkMode = "approval"
    approval_label: str = "preview-approved"
    reapprove_on_push: bool = True
    ttl: float = 72 * 3600.0  # seconds without a push before expiry (0: never); the operator's expiry reads it
    template: str | None = field(default=None, compare=False)  # the PreviewTemplate that changed it, if any

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        """The cluster-wide policy."""
        return cls(
            allow=tuple(entry.lower() for entry in settings.policy_allow),
            drafts=settings.webhook_draft_prs,
            bot_authors=frozenset(login.lower() for login in settings.policy_bot_authors),
            skip_all_bots=settings.policy_skip_all_bots,
            opt_in=settings.policy_opt_in,
            opt_in_label=settings.policy_opt_in_label,
            forks=settings.policy_forks,
            approval_label=settings.policy_approval_label,
            reapprove_on_push=settings.policy_reapprove_on_push,
            ttl=settings.policy_ttl,
        )

    def overridden(self, override: RepositoryPolicy | None, template: str | None) -> Policy:
        """This policy with a template's `policy` block applied."""
        if override is None:
            return self
        changes: dict[str, Any] = {
            name: value
            for name in ("drafts", "skip_all_bots", "opt_in", "forks", "reapprove_on_push")
            if (value := getattr(override, name)) is not None
        }
        if override.ttl_seconds is not None:
            changes["ttl"] = float(override.ttl_seconds)
        if override.bot_authors is not None:
            changes["bot_authors"] = frozenset(login.lower() for login in override.bot_authors)
        return replace(self, **changes, template=template)

    def relevant_labels(self) -> frozenset[str]:
        """The PR labels whose change can change a decision or the mirrored marks."""
        return frozenset({self.opt_in_label, self.approval_label, PRIORITY_PR_LABEL, KEEP_PR_LABEL})


@dataclass(frozen=True)
class Approval:
    """The approval label on a fork's PR: who applied it, at which head, and whether they may write
    (None: nobody could ask GitHub, as when no credentials reach the repository)."""

    login: str
    sha: str
    writer: bool | None


@dataclass(frozen=True)
class PullRequestFacts:
    repository: str  # owner/name
    number: int
    draft: bool
    author: str
    author_is_bot: bool  # GitHub's user.type is Bot
    fork: bool  # its head is in another repository (or in a deleted one)
    labels: frozenset[str]
    head_sha: str
    approval: Approval | None = None


@dataclass(frozen=True)
class Decision:
    admit: bool
    code: str  # ADMITTED or one of REFUSALS
    reason: str


def allowed(allow: Iterable[str], repository: str) -> bool:
    """Whether the allowlist lets `repository` in: an empty list, its owner, or its exact name."""
    entries = [entry.lower() for entry in allow]
    if not entries:
        return True
    owner = repository.split("/", 1)[0].lower()
    return owner in entries or repository.lower() in entries


def _refuse(code: str, reason: str) -> Decision:
    assert code in REFUSALS
    return Decision(False, code, reason)


def decide(policy: Policy, facts: PullRequestFacts) -> Decision:
    """Admit the PR, or refuse it with the first rule it fails (the module's docstring lists them)."""
    where = f" (PreviewTemplate {policy.template})" if policy.template else ""
    if not allowed(policy.allow, facts.repository):
        return _refuse("not_allowed", f"{facts.repository} is not in the allowlist (EPHEMERA_POLICY_ALLOW): no preview")
    author = facts.author.lower()
    if author in policy.bot_authors or (policy.skip_all_bots and facts.author_is_bot):
        return _refuse("bot_author", f"PRs by {facts.author} (a bot) get no preview{where}")
    if facts.draft and not policy.drafts:
        return _refuse("draft", f"draft PRs get no preview{where}; marking it ready for review creates it")
    if policy.opt_in and policy.opt_in_label not in facts.labels:
        return _refuse("not_opted_in", f"only PRs labelled {policy.opt_in_label!r} get a preview{where}")
    if facts.fork:
        return _fork(policy, facts, where)
    return Decision(True, ADMITTED, "admitted by the policy")


def _fork(policy: Policy, facts: PullRequestFacts, where: str) -> Decision:
    if policy.forks == "allow":
        return Decision(True, ADMITTED, "admitted by the policy (forks allowed)")
    if policy.forks == "deny":
        return _refuse("fork_denied", f"PRs from forks get no preview{where}")
    label = policy.approval_label
    approval = facts.approval
    how = f"someone with write access to {facts.repository} must apply the label {label!r}"
    if approval is None or label not in facts.labels:
        return _refuse("fork_unapproved", f"a PR from a fork needs approval: {how}")
    if approval.login.lower() == facts.author.lower():
        return _refuse("fork_unapproved", f"the author's own {label!r} label does not count: {how}")
    if approval.writer is None:
        return _refuse(
            "fork_unapproved",
            f"the permission of {approval.login} on {facts.repository} cannot be checked "
            "(no GitHub App or token reaches it): approvals need one",
        )
    if not approval.writer:
        return _refuse("fork_unapproved", f"{approval.login} cannot write to {facts.repository}: {how}")
    if policy.reapprove_on_push and approval.sha != facts.head_sha:
        return _refuse(
            "fork_push_unapproved",
            f"commit {facts.head_sha[:7]} was pushed after the approval of {approval.sha[:7]}; "
            f"to approve it, remove the label {label!r} and apply it again (write access)",
        )
    return Decision(True, ADMITTED, f"admitted: a fork's PR approved by {approval.login}")


def mirrored(labels: Iterable[str]) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """The object's labels and annotations that mirror the PR's labels, as a merge patch (None removes)."""
    names = set(labels)
    priority = "true" if PRIORITY_PR_LABEL in names else None
    keep = "true" if KEEP_PR_LABEL in names else None
    return {PRIORITY_LABEL: priority}, {KEEP_LABEL_ANNOTATION: keep}


def for_repository(base: Policy, templates: Iterable[Mapping[str, Any]], repository: str) -> Policy:
    """The policy of `repository`: the cluster's, with the `policy` block of the PreviewTemplate that
    matches it most specifically (as the operator picks the template). Templates that do not parse are
    passed over (the operator fails their environments with the reason); an ambiguous match leaves
    the cluster's policy, as the operator leaves those environments Failed."""
    best: tuple[tuple[int, int], str, RepositoryPolicy | None] | None = None
    tie = False
    for body in templates:
        spec = body.get("spec") or {}
        patterns = [p for p in spec.get("repositories") or [] if isinstance(p, str)]
        scores = [specificity(p) for p in patterns if fnmatch.fnmatchcase(repository.lower(), p.lower())]
        if not scores:
            continue
        try:
            override = RepositoryPolicy.model_validate(spec["policy"]) if spec.get("policy") is not None else None
        except ValidationError:
            continue
        score = max(scores)
        if best is None or score > best[0]:
            best, tie = (score, str((body.get("metadata") or {}).get("name")), override), False
        elif score == best[0]:
            tie = True
    if best is None or tie:
        return base
    return base.overridden(best[2], best[1])
