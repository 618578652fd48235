"""JSON (or text) log lines for both processes.

A JSON line (python-json-logger) holds `time` (RFC 3339, UTC, milliseconds), `level`, `logger`,
`message`, and whatever the call passed through `extra=` as JSON values, so an object reference is a
nested `object` ({apiVersion, kind, name, uid}), never a repr string. kopf's per-object lines carry
their object that way too, and every line about a PreviewEnvironment names its `repository` and `pr`:
the operator tells `Subjects` which repository and PR each object it watches belongs to.
"""

from __future__ import annotations

import datetime
import logging
import sys
from collections.abc import Callable
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from ephemera.api.models import API_VERSION, KIND

# kopf's internals in its records' extras: the operator's settings (not JSON), and what its Event
# poster reads (k8s_ref is written out as `object`).
_KOPF_ATTRS = {"settings", "k8s_skip", "k8s_ref"}


def rfc3339(created: float) -> str:
    """A record's time as RFC 3339 in UTC with milliseconds: 2026-11-29T14:02:11.418Z."""
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reference(ref: Any) -> dict[str, Any] | None:
    """kopf's object reference without its empty fields (a cluster-scoped object has no namespace)."""
    if not isinstance(ref, dict):
        return None
    return {key: value for key, value in ref.items() if value not in (None, "")}


class JsonFormatter(_JsonFormatter):
    def __init__(self) -> None:
        super().__init__(reserved_attrs=[*RESERVED_ATTRS, *_KOPF_ATTRS])

    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        # The fixed fields first, so that every line starts alike.
        log_record["time"] = rfc3339(record.created)
        log_record["level"] = record.levelname.lower()
        log_record["logger"] = record.name
        super().add_fields(log_record, record, message_dict)
        ref = _reference(getattr(record, "k8s_ref", None))
        if ref is not None and "object" not in log_record:
            log_record["object"] = ref


class TextFormatter(logging.Formatter):
    """For a person reading a terminal: the object and its PR before the message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        about = _reference(getattr(record, "object", None)) or _reference(getattr(record, "k8s_ref", None))
        where = [f"{about.get('kind', 'object')}/{about.get('name')}"] if about else []
        repository = getattr(record, "repository", None)
        if repository:
            where.append(f"{repository}#{getattr(record, 'pr', '?')}")
        return f"{line} [{' '.join(where)}]" if where else line


Lookup = Callable[[str], tuple[str, int] | None]


class Subjects:
    """Which repository and PR each PreviewEnvironment belongs to, by name, as the operator's watch
    sees them: so that kopf's own lines about an object (which know only its name) name them too."""

    def __init__(self) -> None:
        self._by_name: dict[str, tuple[str, int]] = {}

    def remember(self, name: str, repository: Any, pull_request: Any) -> None:
        if isinstance(repository, str) and isinstance(pull_request, int):
            self._by_name[name] = (repository, pull_request)

    def forget(self, name: str) -> None:
        self._by_name.pop(name, None)

    def __call__(self, name: str) -> tuple[str, int] | None:
        return self._by_name.get(name)


class SubjectFilter(logging.Filter):
    """Adds `repository` and `pr` to a line about a PreviewEnvironment that lacks them."""

    def __init__(self, lookup: Lookup) -> None:
        super().__init__()
        self.lookup = lookup

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repository", None) is None:
            ref = _reference(getattr(record, "object", None)) or _reference(getattr(record, "k8s_ref", None))
            if ref and ref.get("kind") == KIND and ref.get("name"):
                found = self.lookup(str(ref["name"]))
                if found is not None:
                    record.repository, record.pr = found
        return True


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log and the kubernetes client's debug chatter are not ours to show.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def attach(log_filter: logging.Filter) -> None:
    """Run `log_filter` on every line the process writes (the root logger's handlers)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(log_filter)


def about(name: str, repository: str | None = None, pr: int | None = None) -> dict[str, Any]:
    """`extra=` for a line about one PreviewEnvironment: its reference, and its repository and PR."""
    extra: dict[str, Any] = {"object": {"apiVersion": API_VERSION, "kind": KIND, "name": name}}
    if repository is not None:
        extra["repository"] = repository
        extra["pr"] = pr
    return extra
