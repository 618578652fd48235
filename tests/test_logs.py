"""Both processes log JSON lines: RFC 3339 UTC times with milliseconds, object references as nested
fields, and the repository and PR on every line about an environment."""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from devtools.support import Kubectl, Process, post_webhook, wait_for
from ephemera.api.naming import environment_name
from ephemera.logs import JsonFormatter, SubjectFilter, Subjects, TextFormatter
from tests.conftest import WEBHOOK_SECRET
from tests.test_operator import wait_phase
from tests.test_webhook import pr_event

RFC3339_MS_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def lines(process: Process) -> list[dict[str, Any]]:
    """Every line the process wrote, each parsed as JSON (a line that is not JSON fails the test). Only
    whole lines: the process is writing meanwhile, and the last may be read half written."""
    text = process.log()
    parsed = []
    for number, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), 1):
        if line.strip():
            try:
                parsed.append(json.loads(line))
            except ValueError as err:
                raise AssertionError(f"line {number} of {process.log_path} is not JSON: {line!r}") from err
    return parsed


def check_fields(line: dict[str, Any]) -> None:
    assert RFC3339_MS_UTC.match(line["time"]), line
    assert line["level"] in ("debug", "info", "warning", "error", "critical"), line
    assert isinstance(line["logger"], str), line
    assert isinstance(line["message"], str), line
    if "object" in line:
        assert isinstance(line["object"], dict), line  # nested, never a repr string


def about(found: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [line for line in found if isinstance(line.get("object"), dict) and line["object"].get("name") == name]


def test_the_operators_and_webhooks_lines_are_json_with_the_object_and_its_pr(
    operator: Process, webhook: Process, kubectl: Kubectl
) -> None:
    repository, number = f"octo-org/logs-{uuid.uuid4().hex[:6]}", 17
    name = environment_name(repository, number)
    opened = pr_event("opened", repo=repository, number=number, sha="c" * 40, updated_at="2026-01-01T00:00:00Z")
    assert post_webhook(webhook.port, "pull_request", opened, secret=WEBHOOK_SECRET).status == 202
    wait_phase(kubectl, name, "Ready")
    # kopf's own line for the handler (which knows the object's name only) and ours.
    mine = wait_for(
        lambda: (
            (found := about(lines(operator), name))
            and any(line["logger"] == "kopf.objects" for line in found)
            and found
        ),
        timeout=30,
        what="the operator's lines about the environment",
    )
    for line in lines(operator):
        check_fields(line)
    for line in mine:
        assert line["object"]["kind"] == "PreviewEnvironment", line
        assert line["object"]["name"] == name, line
        assert (line.get("repository"), line.get("pr")) == (repository, number), line

    (created,) = [line for line in about(lines(webhook), name) if line["message"].startswith("created")]
    for line in lines(webhook):
        check_fields(line)
    assert created["object"] == {"apiVersion": "ephemera.dev/v1alpha1", "kind": "PreviewEnvironment", "name": name}
    assert (created["repository"], created["pr"]) == (repository, number)


def record(**extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, "Handler %r succeeded.", ("provision",), None)
    made.created = 1764424931.4186  # 2025-11-29T14:02:11.418Z
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_kopfs_object_reference_becomes_a_nested_object_and_names_its_pr() -> None:
    subjects = Subjects()
    subjects.remember("pr-1-x", "octo-org/x", 1)
    ref = {"apiVersion": "ephemera.dev/v1alpha1", "kind": "PreviewEnvironment", "name": "pr-1-x", "uid": "u1"}
    line = record(k8s_ref={**ref, "namespace": None}, k8s_skip=False, settings=object())
    assert SubjectFilter(subjects).filter(line)
    out = json.loads(JsonFormatter().format(line))
    assert out == {
        "time": "2025-11-29T14:02:11.418Z",
        "level": "info",
        "logger": "kopf.objects",
        "message": "Handler 'provision' succeeded.",
        "repository": "octo-org/x",
        "pr": 1,
        "object": ref,
    }
    # An object the operator has not seen (or has forgotten) gets no PR, and nothing breaks.
    subjects.forget("pr-1-x")
    other = record(k8s_ref=ref)
    SubjectFilter(subjects).filter(other)
    assert "repository" not in json.loads(JsonFormatter().format(other))
    # Text lines, for a person at a terminal, name them too.
    assert TextFormatter().format(line).endswith("[PreviewEnvironment/pr-1-x octo-org/x#1]")
