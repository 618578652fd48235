"""Names and labels of what Ephemera creates: derived, DNS-1123 safe, stable and unique."""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "ephemera"
REPOSITORY_LABEL = "ephemera.dev/repository"
PR_LABEL = "ephemera.dev/pull-request"
ENVIRONMENT_LABEL = "ephemera.dev/environment"
# Ephemera's ownership mark on a namespace: the uid of the PreviewEnvironment that created it.
OWNER_UID_ANNOTATION = "ephemera.dev/owner-uid"
REPOSITORY_ANNOTATION = "ephemera.dev/repository"
RETRY_ANNOTATION = "ephemera.dev/retry"
# The backstop's marks. ORIGIN says who made an object when it was not the webhook (`backstop`);
# TEARDOWN_AFTER (an ISO time) and TEARDOWN_REASON say that the App lost the repository (uninstalled,
# suspended, removed, transferred) and when the backstop tears the environment down if nothing
# cancels it; RENAMED_TO is the repository's name on GitHub after a rename (spec.repository cannot change).
ORIGIN_ANNOTATION = "ephemera.dev/origin"
TEARDOWN_AFTER_ANNOTATION = "ephemera.dev/teardown-after"
TEARDOWN_REASON_ANNOTATION = "ephemera.dev/teardown-reason"
RENAMED_TO_ANNOTATION = "ephemera.dev/renamed-to"
# The operator's finalizer: objects the webhook makes carry it from birth (one patch less for each).
FINALIZER = "ephemera.dev/finalizer"
# kopf's record of the last handled spec (operator/persistence.py): `status.kopf.<key>`, or, as older
# operators left it, the annotation `ephemera.dev/<key>`.
KOPF_STATUS = "kopf"
KOPF_DIFFBASE_KEY = "last-handled-configuration"
# The webhook\'s marks on an object: the PR\'s updated_at it last applied (an older event never wins), the
# delivery that wrote it, and why the PR closed (the teardown comment picks its words from a fixed set).
PR_UPDATED_AT_ANNOTATION = "ephemera.dev/pr-updated-at"
DELIVERY_ANNOTATION = "ephemera.dev/delivery"
CLOSED_REASON_ANNOTATION = "ephemera.dev/closed-reason"
# The policy's marks (#17). The webhook mirrors two of the PR's labels onto the object on every event
# it applies: PRIORITY_LABEL = "true" iff the PR carries `preview-priority` (a label, so that the queue
# can select on it), KEEP_LABEL_ANNOTATION = "true" iff it carries `preview-keep`; each absent otherwise.
PRIORITY_LABEL = "ephemera.dev/priority"
KEEP_LABEL_ANNOTATION = "ephemera.dev/keep-label"
# A person's pin (`kubectl ephemera keep`): any value but "false" keeps the environment from expiring.
KEEP_ANNOTATION = "ephemera.dev/keep"
# An expiry later than last push + ttl (`kubectl ephemera extend`), RFC 3339 UTC.
EXPIRES_AT_ANNOTATION = "ephemera.dev/expires-at"
# `/preview wake` by a writer (signed issue_comment): the comment's created_at; revives an Expired one.
WAKE_ANNOTATION = "ephemera.dev/wake"
# A fork's approval: the head SHA a writer approved with the approval label, and who did.
APPROVED_SHA_ANNOTATION = "ephemera.dev/approved-sha"
APPROVED_BY_ANNOTATION = "ephemera.dev/approved-by"
# The operator shard an object belongs to (`shard_of` its repository, as a decimal string): with
# EPHEMERA_SHARDS > 1 each operator Deployment watches only the objects that carry its own index.
SHARD_LABEL = "ephemera.dev/shard"

_NOT_DNS = re.compile(r"[^a-z0-9]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9._-]+")


# Hex digits of the name's hash. 16 (64 bits): finding another repository and PR whose name
# matches a victim's (to take its namespace name first) would cost 2**64 hashes. Names made before
# this had 8 (32 bits, found in minutes); objects and namespaces that carry them keep working.
DIGEST_HEX = 16
LEGACY_DIGEST_HEX = 8
# On every PreviewEnvironment the webhook (or the backstop) creates, named with DIGEST_HEX digits: the
# webhook mirrors only the objects without it (made by earlier versions, or by hand), to find the
# ones under a legacy name without asking the API server on every event.
NAME_HASH_LABEL = "ephemera.dev/name-hash-bits"
NAME_HASH_BITS = str(DIGEST_HEX * 4)


def _digest(repository: str, pull_request: int, length: int = DIGEST_HEX) -> str:
    # GitHub treats owner and repository names case-insensitively: so does the hash.
    key = f"{repository.lower()}#{pull_request}".encode()
    return hashlib.sha256(key).hexdigest()[:length]


def shard_of(repository: str, shards: int) -> int:
    """The shard of a repository's objects: a stable hash modulo `shards`. sha256, not Python's hash()
    (salted per process): the webhook, every operator and every release must agree. Case-insensitive,
    as GitHub's names are, so that one repository's objects always share a shard."""
    digest = hashlib.sha256(repository.lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def environment_name(repository: str, pull_request: int, prefix: str = "pr") -> str:
    """The namespace (and webhook-made object) name for one PR: `<prefix>-<pr>-<slug>-<hash>`.

    The slug makes it readable; the hash of the exact repository and PR makes it unique, since
    slugs collide (`a-b/c` and `a/b-c`) and are cut to fit 63 characters.
    """
    return _name(repository, pull_request, prefix, DIGEST_HEX)


def is_legacy_name(name: str) -> bool:
    """Whether `name` ends as a legacy name does: a dash and LEGACY_DIGEST_HEX hex digits."""
    tail = name[-LEGACY_DIGEST_HEX - 1 :]
    return len(tail) == LEGACY_DIGEST_HEX + 1 and tail[0] == "-" and all(c in "0123456789abcdef" for c in tail[1:])


def legacy_environment_name(repository: str, pull_request: int, prefix: str = "pr") -> str:
    """The name earlier versions gave the same PR (an 8-hex hash), still used by what they made."""
    return _name(repository, pull_request, prefix, LEGACY_DIGEST_HEX)


def environment_names(repository: str, pull_request: int, prefix: str = "pr") -> tuple[str, str]:
    """Every name one PR's object or namespace may have: the current one first, then the legacy one."""
    return (
        environment_name(repository, pull_request, prefix),
        legacy_environment_name(repository, pull_request, prefix),
    )


def _name(repository: str, pull_request: int, prefix: str, digits: int) -> str:
    head = f"{prefix}-{pull_request}-"
    tail = f"-{_digest(repository, pull_request, digits)}"
    slug = _NOT_DNS.sub("-", repository.lower()).strip("-")
    slug = slug[: max(0, MAX_NAME - len(head) - len(tail))].strip("-")
    if not slug:
        return f"{prefix}-{pull_request}{tail}"
    return f"{head}{slug}{tail}"


def label_value(text: str) -> str:
    """A label value (<= 63 of [A-Za-z0-9._-], alphanumeric at both ends) derived from `text`."""
    value = _NOT_LABEL.sub("_", text)[:MAX_NAME]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def environment_labels(name: str, repository: str, pull_request: int) -> dict[str, str]:
    return {
        MANAGED_BY_LABEL: MANAGED_BY,
        REPOSITORY_LABEL: label_value(repository.replace("/", ".")),
        PR_LABEL: str(pull_request),
        ENVIRONMENT_LABEL: label_value(name),
    }
