"""Failed webhook deliveries, redelivered: GitHub never retries one on its own.

The App's deliveries (`GET /app/hook/deliveries`, newest first, paged by cursor) are read back to
the newest one seen by the previous pass; every delivery GUID with no successful attempt (a 2xx
status code) among them is redelivered once (`POST /app/hook/deliveries/{id}/attempts`). PyGithub
has no methods for these endpoints: its requester makes the calls, as the App (its JWT).

The newest delivery id seen and the GUIDs already redelivered are kept in a ConfigMap, so that a
restarted operator neither scans GitHub's three days of deliveries again nor redelivers twice.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from github import GithubException

from ephemera.api.models import parse_time
from ephemera.api.naming import MANAGED_BY, MANAGED_BY_LABEL
from ephemera.config import Settings
from ephemera.github.client import GitHubAuth
from ephemera.kube import Kube, KubeError, Obj

CONFIG_MAP = "ephemera-backstop"
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT = "backstop"
PAGE_SIZE = 100
# Pages read in one pass at most (10,000 deliveries); the cursor makes the next pass go on from there.
MAX_PAGES = 100

log = logging.getLogger(__name__)


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def _next_cursor(headers: dict[str, Any]) -> str | None:
    """The `cursor` of the Link header's `rel="next"`, if there is a next page."""
    link = next((value for key, value in headers.items() if key.lower() == "link"), None)
    for part in str(link or "").split(","):
        url, _, rel = part.partition(";")
        if 'rel="next"' in rel:
            query = urllib.parse.urlparse(url.strip().strip("<>")).query
            values = urllib.parse.parse_qs(query).get("cursor")
            if values:
                return values[0]
    return None


def succeeded(delivery: dict[str, Any]) -> bool:
    code = delivery.get("status_code")
    return isinstance(code, int) and 200 <= code <= 299


def to_redeliver(deliveries: list[dict[str, Any]], done: set[str]) -> dict[str, int]:
    """GUID -> the id of its newest attempt, for every GUID none of whose attempts succeeded and that
    was not redelivered already (pure: the decision, apart from GitHub and the cluster)."""
    good = {d["guid"] for d in deliveries if succeeded(d)}
    found: dict[str, int] = {}
    for delivery in deliveries:
        guid = delivery["guid"]
        if guid in good or guid in done:
            continue
        found[guid] = max(found.get(guid, 0), int(delivery["id"]))
    return found


class Redeliverer:
    """Reads new deliveries, redelivers the failed ones; its state lives in one ConfigMap."""

    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        auth: GitHubAuth,
        *,
        namespace: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.auth = auth
        self.namespace = namespace
        self.clock = clock

    def run(self) -> int:
        """One pass; the number of deliveries redelivered. Raises GithubException or KubeError."""
        stored = self.kube.get_config_map(self.namespace, CONFIG_MAP)
        data = (stored or {}).get("data") or {}
        cursor = int(data["cursor"]) if str(data.get("cursor", "")).isdigit() else None
        try:
            done: dict[str, str] = json.loads(data.get("redelivered") or "{}")
        except ValueError:
            done = {}
        now = self.clock()
        oldest = now - self.settings.backstop_redelivery_window
        deliveries = self._read(cursor, oldest)
        pending = to_redeliver(deliveries, set(done))
        requester = self.auth.app_client().requester
        failed = False
        count = 0
        for guid, delivery_id in sorted(pending.items(), key=lambda item: item[1]):
            try:
                requester.requestJsonAndCheck("POST", f"/app/hook/deliveries/{delivery_id}/attempts")
            except GithubException as err:
                failed = True
                log.warning("could not redeliver delivery %s (%s): %s", delivery_id, guid, err.status)
                continue
            done[guid] = _iso(now)
            count += 1
            log.info("redelivered webhook delivery %s (%s)", delivery_id, guid)
        newest = max([int(d["id"]) for d in deliveries] + ([cursor] if cursor is not None else []), default=None)
        # After a failed redelivery the cursor stays, so the next pass sees that delivery again (the
        # GUIDs already redelivered are remembered either way, so none is redelivered twice).
        keep_cursor = cursor if failed else newest
        recent = {
            guid: at
            for guid, at in done.items()
            if (parse_time(at) or datetime.datetime.min.replace(tzinfo=datetime.UTC)).timestamp() >= oldest
        }
        self._save(stored, keep_cursor, recent)
        return count

    def _read(self, cursor: int | None, oldest: float) -> list[dict[str, Any]]:
        """Deliveries newer than `cursor` (and than `oldest`), newest first."""
        requester = self.auth.app_client().requester
        found: list[dict[str, Any]] = []
        page: str | None = None
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {"per_page": PAGE_SIZE}
            if page is not None:
                params["cursor"] = page
            headers, items = requester.requestJsonAndCheck("GET", "/app/hook/deliveries", parameters=params)
            for item in items or []:
                delivered = parse_time(item.get("delivered_at"))
                if cursor is not None and int(item["id"]) <= cursor:
                    return found
                if delivered is not None and delivered.timestamp() < oldest:
                    return found
                found.append(item)
            page = _next_cursor(headers)
            if page is None or not items:
                return found
        return found

    def _save(self, stored: Obj | None, cursor: int | None, done: dict[str, str]) -> None:
        body: Obj = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": CONFIG_MAP,
                "namespace": self.namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY, COMPONENT_LABEL: COMPONENT},
            },
            "data": {
                "cursor": "" if cursor is None else str(cursor),
                "redelivered": json.dumps(done, separators=(",", ":"), sort_keys=True),
            },
        }
        try:
            if stored is None:
                self.kube.create_config_map(body)
            else:
                body["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
                self.kube.replace_config_map(body)
        except KubeError as err:
            # Only one replica runs the backstop; a conflict is a hand edit. The next pass reads anew.
            if err.status != 409:
                raise
