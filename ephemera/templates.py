"""PreviewTemplate: what runs in a preview, rendered for one pull request.

Platform admins own PreviewTemplates (cluster-scoped); a PR's repository never supplies one, so a fork
cannot choose what runs in the cluster. This module is the pure part: which template a repository
gets, rendering its placeholders in a sandbox, and refusing every object that would reach outside the
preview namespace. Applying, pruning and waiting for readiness belong to the service.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, nodes
from jinja2 import TemplateError as JinjaError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ephemera.api.models import PreviewEnvironmentSpec

# What a template may never create, unless an admin changes the setting: the namespace itself, cluster
# roles and bindings, and (`RoleBinding/ClusterRole`) a RoleBinding that grants a ClusterRole.
DEFAULT_DENY = ("Namespace", "ClusterRole", "ClusterRoleBinding", "RoleBinding/ClusterRole")
# Placeholders whose values come from the PR's author: they must never change a document's shape.
UNTRUSTED = ("pr.title", "pr.author", "branch", "branch_slug")
_SLUG = re.compile(r"[^a-z0-9]+")
REPOSITORY_GLOB = r"^[A-Za-z0-9*?\[\]_-]+/[A-Za-z0-9*?\[\]._-]+$"


class TemplateError(Exception):
    """A template that cannot be rendered or applied as it is; `reason` is the Failed reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# The spec -------------------------------------------------------------------------------------------


class HelmSource(BaseModel):
    """A chart rendered with `helm template`, applied like inline resources."""

    model_config = ConfigDict(extra="forbid")

    repository: str = Field(pattern=r"^(https?|oci)://\S+$", max_length=2048)
    chart: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
    version: str = Field(min_length=1, max_length=128)
    values: dict[str, Any] = Field(default_factory=dict)


class WorkloadRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern=r"^(Deployment|StatefulSet|DaemonSet|Job)$")
    name: str = Field(min_length=1, max_length=253)


class Readiness(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    timeout_seconds: int | None = Field(None, alias="timeoutSeconds", ge=1, le=86400)
    workloads: list[WorkloadRef] | None = None


class HookTarget(BaseModel):
    """A result hook's target (ephemera/hooks.py)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://[^\s/]+\S*$", max_length=2048)


ForkMode = Literal["approval", "allow", "deny"]


class RepositoryPolicy(BaseModel):
    """A PreviewTemplate's `policy` block: what differs from the cluster-wide policy for the repositories
    it matches (an unset field keeps the cluster's). Mirrors crds/previewtemplates.yaml;
    policy.py applies it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    drafts: bool | None = None
    bot_authors: list[Annotated[str, Field(min_length=1, max_length=39)]] | None = Field(
        None, alias="botAuthors", max_length=100
    )
    skip_all_bots: bool | None = Field(None, alias="skipAllBots")
    opt_in: bool | None = Field(None, alias="optIn")
    forks: ForkMode | None = None
    reapprove_on_push: bool | None = Field(None, alias="reapproveOnPush")
    # How long the repositories' previews live without a push (the expiry; 0: never).
    ttl_seconds: int | None = Field(None, alias="ttlSeconds", ge=0)


class PreviewTemplateSpec(BaseModel):
    """What a matching PR's preview runs; mirrors crds/previewtemplates.yaml."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    repositories: list[Annotated[str, Field(pattern=REPOSITORY_GLOB, max_length=141)]] = Field(
        min_length=1, max_length=100
    )
    resources: list[dict[str, Any]] | None = None
    manifests: str | None = None
    helm: HelmSource | None = None
    url: str | None = Field(None, max_length=2048)
    hooks: list[HookTarget] = Field(default_factory=list, max_length=10)
    readiness: Readiness = Field(default_factory=Readiness)
    policy: RepositoryPolicy | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PreviewTemplateSpec:
        sources = [name for name in ("resources", "manifests", "helm") if getattr(self, name) is not None]
        if len(sources) > 1:
            raise ValueError(f"set one of resources, manifests and helm, not {' and '.join(sources)}")
        return self


@dataclass(frozen=True)
class Template:
    name: str
    spec: PreviewTemplateSpec
    generation: int = 1

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Template:
        meta = body.get("metadata") or {}
        try:
            spec = PreviewTemplateSpec.model_validate(dict(body.get("spec") or {}))
        except ValidationError as err:
            problems = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            raise TemplateError("InvalidTemplate", f"PreviewTemplate {meta.get('name')}: {problems}") from err
        return cls(name=str(meta.get("name")), spec=spec, generation=int(meta.get("generation") or 1))


# Which template ---------------------------------------------------------------------------------------


def specificity(pattern: str) -> tuple[int, int]:
    """How specific a repository pattern is: an exact name beats any glob, then more literal characters."""
    wildcards = sum(pattern.count(c) for c in "*?[")
    literal = len(re.sub(r"\[[^\]]*\]|[*?]", "", pattern))
    return (0 if wildcards else 1, literal)


def select(templates: Iterable[Template], repository: str) -> Template | None:
    """The template whose most specific pattern matches `repository` (case-insensitively, as GitHub
    names are); None means a namespace only. Two templates matching equally specifically is an error."""
    best: list[tuple[tuple[int, int], Template]] = []
    for template in templates:
        scores = [
            specificity(p) for p in template.spec.repositories if fnmatch.fnmatchcase(repository.lower(), p.lower())
        ]
        if scores:
            best.append((max(scores), template))
    if not best:
        return None
    best.sort(key=lambda item: item[0], reverse=True)
    if len(best) > 1 and best[0][0] == best[1][0]:
        names = sorted(t.name for score, t in best if score == best[0][0])
        raise TemplateError(
            "AmbiguousTemplate",
            f"PreviewTemplates {' and '.join(names)} match {repository} equally specifically; "
            "make one pattern more specific",
        )
    return best[0][1]


# Placeholders -----------------------------------------------------------------------------------------


def slug(text: str, limit: int = 63) -> str:
    """A DNS-label-safe form of `text` (a branch name), at most `limit` characters."""
    return _SLUG.sub("-", text.lower()).strip("-")[:limit].strip("-") or "x"


def placeholders(
    spec: PreviewEnvironmentSpec, *, namespace: str, host: str, title: str | None = None
) -> dict[str, Any]:
    """The values a template may use, as nested mappings (`pr.number`, `commit.short`, ...)."""
    owner, name = spec.repository.split("/", 1)
    return {
        "pr": {"number": spec.pull_request, "title": title or "", "author": spec.author or ""},
        "repository": spec.repository,
        "owner": owner,
        "name": name,
        "branch": spec.branch,
        "branch_slug": slug(spec.branch),
        "commit": {"sha": spec.commit_sha, "short": spec.commit_sha[:7]},
        "namespace": namespace,
        "host": host,
    }


def _probe(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with every untrusted value replaced by a plain token: the shape a render must keep."""
    probe: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
    for dotted in UNTRUSTED:
        head, _, tail = dotted.partition(".")
        if tail:
            probe[head][tail] = "ephemera-probe"
        else:
            probe[head] = "ephemera-probe"
    return probe


_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def render_text(text: str, values: Mapping[str, Any], where: str) -> str:
    """Render one template string in the sandbox; any failure is a TemplateError naming `where`."""
    try:
        return _ENV.from_string(text).render(**values)
    except UndefinedError as err:
        unknown = ", ".join(_unknown(text, values)) or err.message
        known = ", ".join(_names(values))
        raise TemplateError("TemplateRenderError", f"{where}: unknown placeholder {unknown} (known: {known})") from err
    except TemplateSyntaxError as err:
        raise TemplateError("TemplateRenderError", f"{where}, line {err.lineno}: {err.message}") from err
    except SecurityError as err:
        raise TemplateError("TemplateRenderError", f"{where}: not allowed in a template: {err}") from err
    except JinjaError as err:
        raise TemplateError("TemplateRenderError", f"{where}: {err}") from err


def _unknown(text: str, values: Mapping[str, Any]) -> list[str]:
    """The dotted names (`pr.nmuber`) that `text` uses but `values` lacks."""
    known = set(_names(values)) | set(values)
    found: list[str] = []
    for node in _ENV.parse(text).find_all((nodes.Getattr, nodes.Name)):
        parts: list[str] = []
        while isinstance(node, nodes.Getattr):
            parts.insert(0, node.attr)
            node = node.node
        if isinstance(node, nodes.Name) and node.ctx == "load":
            dotted = ".".join([node.name, *parts])
            if dotted not in known and dotted not in found and not any(k.startswith(dotted + ".") for k in known):
                found.append(dotted)
    # `pr.nmuber` also shows as its prefix `pr`, which is known; only the full names are reported.
    return [name for name in found if not any(other.startswith(name + ".") for other in found)]


def _names(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    names: list[str] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            names += _names(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def render_tree(node: Any, values: Mapping[str, Any], where: str) -> Any:
    """Render every string in a tree of mappings and lists; keys and the shape stay as written."""
    if isinstance(node, str):
        return render_text(node, values, where) if ("{{" in node or "{%" in node) else node
    if isinstance(node, Mapping):
        return {key: render_tree(value, values, f"{where}.{key}") for key, value in node.items()}
    if isinstance(node, list):
        return [render_tree(value, values, f"{where}[{i}]") for i, value in enumerate(node)]
    return node


def _shape(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {key: _shape(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_shape(value) for value in node]
    return None


def _documents(text: str, where: str) -> list[Any]:
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as err:
        raise TemplateError("TemplateRenderError", f"{where}: the rendered YAML does not parse: {err}") from err


def render_manifests(text: str, values: Mapping[str, Any], where: str = "spec.manifests") -> list[Any]:
    """Render YAML text, then parse it. A PR's title, author or branch can never add a key, an object
    or a list item: the result must have the shape that plain values give, or it is refused."""
    documents = _documents(render_text(text, values, where), where)
    if _shape(documents) != _shape(_documents(render_text(text, _probe(values), where), where)):
        raise TemplateError(
            "TemplateRenderError",
            f"{where}: the PR's {', '.join(UNTRUSTED)} change the YAML's structure; quote such placeholders "
            "with the tojson filter, e.g. {{ pr.title | tojson }}",
        )
    return documents


def render(template: Template, values: Mapping[str, Any]) -> tuple[list[Any], str | None]:
    """The objects of an inline template (resources or manifests) and its URL, rendered."""
    spec = template.spec
    url = render_text(spec.url, values, "spec.url") if spec.url else None
    if spec.resources is not None:
        return render_tree(spec.resources, values, "spec.resources"), url
    if spec.manifests is not None:
        return render_manifests(spec.manifests, values), url
    return [], url


# What may be applied ----------------------------------------------------------------------------------


# Whether a kind (apiVersion, kind) is namespaced: True, False, or None when the API server has no such kind.
Scope = Callable[[str, str], bool | None]


def check_objects(
    objects: Iterable[Any],
    namespace: str,
    namespaced: Scope,
    *,
    deny: Iterable[str] = DEFAULT_DENY,
    reserved: Iterable[tuple[str, str]] = (),
) -> list[dict[str, Any]]:
    """Refuse the whole set if any object would reach outside `namespace`; else the objects, each placed
    in it. `reserved` are (kind, name) pairs of Ephemera's own guards, which a template cannot replace."""
    denied = set(deny)
    taken = set(reserved)
    seen: set[tuple[str, str, str]] = set()
    checked: list[dict[str, Any]] = []
    for index, obj in enumerate(objects):
        where = f"object {index + 1}"
        if not isinstance(obj, Mapping):
            raise TemplateError("InvalidObject", f"{where} is not a mapping")
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        meta = obj.get("metadata")
        if not isinstance(api_version, str) or not isinstance(kind, str) or not isinstance(meta, Mapping):
            raise TemplateError("InvalidObject", f"{where} needs apiVersion, kind and metadata")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise TemplateError("InvalidObject", f"{where} ({kind}) needs metadata.name")
        where = f"{kind} {name}"
        if kind in denied:
            raise TemplateError("ObjectDenied", f"{where}: kind {kind} is not allowed in a preview")
        role_ref = obj.get("roleRef") if kind == "RoleBinding" else None
        if isinstance(role_ref, Mapping) and f"RoleBinding/{role_ref.get('kind')}" in denied:
            raise TemplateError(
                "ObjectDenied", f"{where}: a RoleBinding to a {role_ref.get('kind')} is not allowed in a preview"
            )
        scope = namespaced(api_version, kind)
        if scope is None:
            raise TemplateError("UnknownKind", f"{where}: the API server has no kind {kind} in {api_version}")
        if not scope:
            raise TemplateError(
                "ObjectDenied", f"{where}: {kind} is cluster-scoped; a preview holds namespaced objects only"
            )
        if meta.get("namespace") not in (None, "", namespace):
            raise TemplateError(
                "ObjectDenied", f"{where} names namespace {meta.get('namespace')}; a preview writes only to its own"
            )
        if (kind, name) in taken:
            raise TemplateError("ObjectDenied", f"{where} would replace one of Ephemera's own guards")
        key = (api_version.split("/")[0] if "/" in api_version else "", kind, name)
        if key in seen:
            raise TemplateError("InvalidObject", f"{where} appears twice")
        seen.add(key)
        checked.append({**obj, "metadata": {**meta, "namespace": namespace}})
    return checked
