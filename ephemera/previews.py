"""The application in a preview: the PreviewTemplate that matches a PR, rendered and applied into its
namespace, and the readiness of what it runs.

The service behind the operator's app handlers. It finds the template (admin-owned, cluster-scoped),
renders it for the PR, applies it through the Applier (inline resources and Helm charts alike), and
judges readiness. Every failure that a retry cannot mend is a `TemplateError` naming the template,
the object and the cause.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ephemera.api.models import PreviewEnvironmentSpec
from ephemera.apply import Applier, Ref
from ephemera.charts import render_chart
from ephemera.kube import Kube
from ephemera.readiness import Assessment
from ephemera.templates import (
    Template,
    TemplateError,
    placeholders,
    render,
    render_text,
    render_tree,
    select,
)


@dataclass(frozen=True)
class Rollout:
    """What one apply did: the template, the objects now in the namespace, the URL and what to wait for."""

    template: str
    generation: int
    inventory: list[Ref]
    url: str | None
    workloads: list[tuple[str, str]] = field(default_factory=list)  # (kind, name); empty: every workload
    timeout: float | None = None

    def status(self) -> dict[str, Any]:
        """The environment's status fields for this rollout."""
        template: dict[str, Any] = {"name": self.template, "generation": self.generation}
        if self.workloads:
            template["workloads"] = [f"{kind}/{name}" for kind, name in self.workloads]
        return {"template": template, "inventory": [ref.to_status() for ref in self.inventory], "url": self.url}

    @staticmethod
    def awaited(status: dict[str, Any]) -> tuple[list[Ref], list[tuple[str, str]]]:
        """The inventory and the workloads to wait for, as `status()` wrote them."""
        inventory = [Ref.from_status(entry) for entry in status.get("inventory") or []]
        workloads = [tuple(item.split("/", 1)) for item in (status.get("template") or {}).get("workloads") or []]
        return inventory, [(kind, name) for kind, name in workloads]


class Previews:
    """Find, render and apply the template of one environment; judge its readiness."""

    def __init__(
        self,
        kube: Kube,
        applier: Applier,
        *,
        domain: str,
        helm: Path | None = None,
        helm_timeout: float = 120.0,
        templates: Callable[[], list[Template]] | None = None,
    ) -> None:
        self.kube = kube
        self.applier = applier
        self._cached = templates
        self.domain = domain
        self.helm = helm
        self.helm_timeout = helm_timeout

    def templates(self) -> list[Template]:
        """Every PreviewTemplate (one the API server let through but that does not parse is an error).

        The operator keeps them from its watch (`templates`); without that, they are listed."""
        if self._cached is not None:
            return self._cached()
        return [Template.from_body(body) for body in self.kube.list_templates()]

    def host(self, namespace: str) -> str:
        return f"{namespace}.{self.domain}"

    def template_for(self, repository: str) -> Template | None:
        return select(self.templates(), repository)

    def rollout(
        self, spec: PreviewEnvironmentSpec, namespace: str, labels: dict[str, str], previous: list[Ref]
    ) -> Rollout | None:
        """Render and apply the matching template; None if no template matches (a namespace only).

        KubeError (temporary) when the API server cannot be reached; TemplateError for the rest."""
        template = self.template_for(spec.repository)
        if template is None:
            if previous:  # its template is gone (or no longer matches): what it applied goes too
                self.applier.apply([], namespace, labels, previous)
            return None
        values = placeholders(spec, namespace=namespace, host=self.host(namespace), title=spec.title)
        objects, url = render(template, values)
        helm = template.spec.helm
        if helm is not None:
            if self.helm is None:
                raise TemplateError("ChartRenderError", "no helm binary is configured (EPHEMERA_HELM_BINARY)")
            source = helm.model_copy(update={"values": render_tree(helm.values, values, "spec.helm.values")})
            with tempfile.TemporaryDirectory(prefix="ephemera-helm-") as home:
                objects = render_chart(self.helm, source, namespace, home=Path(home), timeout=self.helm_timeout)
        inventory = self.applier.apply(objects, namespace, labels, previous)
        readiness = template.spec.readiness
        workloads = [
            (w.kind, render_text(w.name, values, "spec.readiness.workloads")) for w in readiness.workloads or []
        ]
        timeout = float(readiness.timeout_seconds) if readiness.timeout_seconds else None
        return Rollout(template.name, template.generation, inventory, url, workloads, timeout)

    def assess(self, namespace: str, rollout: Rollout) -> Assessment:
        """Whether what the rollout applied is ready (KubeError if the API server cannot be reached)."""
        return self.applier.observe(namespace, rollout.inventory, rollout.workloads)
