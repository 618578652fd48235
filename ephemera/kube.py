"""The Kubernetes adapter: the few API calls Ephemera makes, on one shared client.

The official client is synchronous: call these from kopf's sync handlers (a thread pool) or through
`asyncio.to_thread`, never straight from a coroutine.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from ephemera.api.models import GROUP, PLURAL, TEMPLATE_PLURAL, VERSION

Obj = dict[str, Any]


class KubeError(Exception):
    """An API call that failed; `temporary` says whether trying again may help."""

    def __init__(self, message: str, *, status: int | None = None, temporary: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.temporary = temporary


def _wrap(err: ApiException, what: str) -> KubeError:
    status = err.status or 0
    try:
        detail = json.loads(err.body or "{}").get("message", err.reason)
    except ValueError:
        detail = err.reason
    # 409 conflicts, 429 throttling and 5xx pass; 4xx validation and permission errors do not.
    temporary = status in (0, 409, 429) or status >= 500
    return KubeError(f"{what}: {status} {detail}", status=status, temporary=temporary)


def load_api_client(
    kubeconfig: Path | None = None, pool_size: int = 50, *, context: str | None = None
) -> client.ApiClient:
    """An ApiClient from `kubeconfig`, else in-cluster config, else the default kubeconfig.

    A `context` names one of the kubeconfig's contexts (the default kubeconfig's if none is given)."""
    configuration = client.Configuration()
    if kubeconfig is not None or context is not None:
        config.load_kube_config(
            config_file=str(kubeconfig) if kubeconfig is not None else None,
            context=context,
            client_configuration=configuration,
        )
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    configuration.retries = False  # callers decide what to retry; urllib3's silent retries would hide it
    return client.ApiClient(configuration)


# Where each kind of child lives in the API.
CHILD_PATHS = {
    "ResourceQuota": "/api/v1/namespaces/{namespace}/resourcequotas",
    "LimitRange": "/api/v1/namespaces/{namespace}/limitranges",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies",
}
ENVIRONMENTS = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
TEMPLATES = f"/apis/{GROUP}/{VERSION}/{TEMPLATE_PLURAL}"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: bodies are sent as JSON
PAGE_SIZE = 500  # items a list reads at a time
# Lists of metadata only (no spec or status), and the fields of a namespace the operator reads.
METADATA = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,application/json"
NAMESPACE_FIELDS = (
    "name",
    "uid",
    "labels",
    "annotations",
    "ownerReferences",
    "creationTimestamp",
    "deletionTimestamp",
)


class Kube:
    """Typed-enough access to namespaces, their children, events and PreviewEnvironments.

    Every call goes through `_request`: the client's configuration, connection pool and credentials,
    but not its generated methods, whose per-call argument validation and model decoding were a third
    of the operator's CPU in a burst of new environments.
    """

    def __init__(self, api_client: client.ApiClient, request_timeout: float = 30.0) -> None:
        self.api_client = api_client
        self.timeout = request_timeout

    def close(self) -> None:
        self.api_client.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, Any]] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> Obj:
        """One API request; the decoded JSON answer, or ApiException as the generated client raises it.

        The single way to the API server, so the one place that turns a failure to reach it (refused,
        reset, timed out) into a temporary KubeError."""
        _, url, headers, data, _ = self.api_client.param_serialize(
            method,
            path,
            query_params=query or None,
            header_params={"Accept": accept, "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api_client.call_api(method, url, headers, data, _request_timeout=self.timeout)
            raw = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise KubeError(f"{method} {path}: Kubernetes API unreachable: {err}", status=0) from err
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        answer: Obj = json.loads(raw) if raw else {}
        return answer

    def _get(self, path: str, what: str) -> Obj | None:
        """GET `path`; None if it does not exist."""
        try:
            return self._request("GET", path)
        except ApiException as err:
            if err.status == 404:
                return None
            raise _wrap(err, f"reading {what}") from err

    def _pages(
        self, path: str, what: str, query: list[tuple[str, Any]] | None = None, accept: str = "application/json"
    ) -> Iterator[Obj]:
        """Every item of a list, read in pages of PAGE_SIZE."""
        token: str | None = None
        while True:
            paging: list[tuple[str, Any]] = [("limit", PAGE_SIZE)] + ([("continue", token)] if token else [])
            try:
                data = self._request("GET", path, query=(query or []) + paging, accept=accept)
            except ApiException as err:
                raise _wrap(err, f"listing {what}") from err
            # An empty list of metadata comes back as `"items": null`: no items, not an error.
            yield from data.get("items") or []
            token = (data.get("metadata") or {}).get("continue")
            if not token:
                return

    def snapshot(self, path: str, what: str, selector: str) -> tuple[list[Obj], str]:
        """Every item of a list with the label `selector`, and the resourceVersion to watch it from."""
        items: list[Obj] = []
        token: str | None = None
        version = ""
        while True:
            query: list[tuple[str, Any]] = [("labelSelector", selector), ("limit", PAGE_SIZE)]
            try:
                data = self._request("GET", path, query=query + ([("continue", token)] if token else []))
            except ApiException as err:
                raise _wrap(err, f"listing {what}") from err
            items.extend(data.get("items") or [])
            meta = data.get("metadata") or {}
            version = version or str(meta.get("resourceVersion", ""))  # every page is of the first's snapshot
            token = meta.get("continue")
            if not token:
                return items, version

    def watch(self, path: str, what: str, selector: str, version: str, seconds: int) -> Iterator[tuple[str, Obj]]:
        """(event type, object) of the list `path` with the label `selector` after `version`, bookmarks
        included, until the API server ends the watch after `seconds`; read it on a thread of its own.
        An `ERROR` event (410: the version is too old) is passed on as such."""
        query: list[tuple[str, Any]] = [
            ("labelSelector", selector),
            ("watch", "true"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", seconds),
        ]
        _, url, headers, _, _ = self.api_client.param_serialize(
            "GET", path, query_params=query, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
        )
        try:
            response = self.api_client.call_api("GET", url, headers, _request_timeout=(self.timeout, seconds + 30))
            if response.status != 200:
                response.read()
                raise _wrap(ApiException(http_resp=response), f"watching {what}")
            pending = b""
            for chunk in response.response.stream(65536):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        event = json.loads(line)
                        yield str(event["type"]), event["object"]
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise KubeError(f"watching {what}: Kubernetes API unreachable: {err}", status=0) from err

    # Namespaces ---------------------------------------------------------------------------------

    def get_namespace(self, name: str) -> Obj | None:
        return self._get(f"/api/v1/namespaces/{name}", f"namespace {name}")

    def list_namespaces(self, label_selector: str) -> list[Obj]:
        """The namespaces with the labels, metadata only and trimmed to what is read of them: with
        thousands of environments a whole list (managed fields and all) would weigh tens of megabytes."""
        pages = self._pages("/api/v1/namespaces", "namespaces", [("labelSelector", label_selector)], accept=METADATA)
        metas = (item.get("metadata", {}) for item in pages)
        return [{"metadata": {k: meta[k] for k in NAMESPACE_FIELDS if k in meta}} for meta in metas]

    def create_namespace(self, body: Obj) -> Obj | None:
        """Create it; None if a namespace of that name already exists."""
        try:
            return self._request("POST", "/api/v1/namespaces", body=body)
        except ApiException as err:
            if err.status == 409:
                return None
            raise _wrap(err, f"creating namespace {body['metadata']['name']}") from err

    def delete_namespace(self, name: str, uid: str) -> None:
        """Delete the namespace if it is still the one with `uid` (a precondition, so never another)."""
        try:
            self._request("DELETE", f"/api/v1/namespaces/{name}", body={"preconditions": {"uid": uid}})
        except ApiException as err:
            if err.status in (404, 409):  # gone already, or a different namespace now holds the name
                return
            raise _wrap(err, f"deleting namespace {name}") from err

    # Children -------------------------------------------------------------------------------------

    @staticmethod
    def _child_path(kind: str, namespace: str) -> str:
        if kind not in CHILD_PATHS:
            raise ValueError(f"unknown child kind {kind}")
        return CHILD_PATHS[kind].format(namespace=namespace)

    def get_child(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self._get(f"{self._child_path(kind, namespace)}/{name}", f"{kind} {namespace}/{name}")

    def create_child(self, body: Obj) -> bool:
        """Create it; False if it exists already."""
        meta = body["metadata"]
        try:
            self._request("POST", self._child_path(body["kind"], meta["namespace"]), body=body)
        except ApiException as err:
            if err.status == 409:
                return False
            raise _wrap(err, f"creating {body['kind']} {meta['namespace']}/{meta['name']}") from err
        return True

    def replace_child(self, body: Obj, resource_version: str) -> None:
        meta = body["metadata"]
        body = {**body, "metadata": {**meta, "resourceVersion": resource_version}}
        path = f"{self._child_path(body['kind'], meta['namespace'])}/{meta['name']}"
        try:
            self._request("PUT", path, body=body)
        except ApiException as err:
            raise _wrap(err, f"replacing {body['kind']} {meta['namespace']}/{meta['name']}") from err

    # PreviewEnvironments ----------------------------------------------------------------------------

    def get_environment(self, name: str) -> Obj | None:
        return self._get(f"{ENVIRONMENTS}/{name}", f"PreviewEnvironment {name}")

    def list_environments(self, label_selector: str | None = None) -> Iterator[Obj]:
        """Every PreviewEnvironment (those `label_selector` selects), in pages, so that thousands never
        load at once, and without its managed fields: no caller reads them, and they are more than half
        of an object in memory (about 10 KB with them, 4 KB without), which the periodic resyncs hold
        for every object at once."""
        query = [("labelSelector", label_selector)] if label_selector else None
        for obj in self._pages(ENVIRONMENTS, "PreviewEnvironments", query):
            (obj.get("metadata") or {}).pop("managedFields", None)
            yield obj

    def list_events(self, kind: str, name: str, namespace: str = "default") -> list[Obj]:
        """The Events about the object `kind`/`name` (a cluster-scoped object's are kept in `default`)."""
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        path = f"/api/v1/namespaces/{namespace}/events"
        return list(self._pages(path, f"Events of {name}", [("fieldSelector", selector)]))

    def patch_environment_status(self, name: str, status: Obj) -> Obj | None:
        """Merge `status` into the object's status; None if the object is gone."""
        try:
            return self._request(
                "PATCH", f"{ENVIRONMENTS}/{name}/status", body={"status": status}, content_type=MERGE_PATCH
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise _wrap(err, f"patching the status of PreviewEnvironment {name}") from err

    def create_environment(self, body: Obj) -> None:
        try:
            self._request("POST", ENVIRONMENTS, body=body)
        except ApiException as err:
            raise _wrap(err, f"creating PreviewEnvironment {body['metadata']['name']}") from err

    def patch_environment(self, name: str, patch: Obj, *, missing_ok: bool = True) -> None:
        """A JSON merge patch; with metadata.resourceVersion in it, a 409 if the object changed since."""
        try:
            self._request("PATCH", f"{ENVIRONMENTS}/{name}", body=patch, content_type=MERGE_PATCH)
        except ApiException as err:
            if err.status == 404 and missing_ok:
                return
            raise _wrap(err, f"patching PreviewEnvironment {name}") from err

    def delete_environment(self, name: str, uid: str | None = None) -> None:
        """Delete it (only the one with `uid`, if given); a missing object is fine."""
        options = {"preconditions": {"uid": uid}} if uid else {}
        try:
            self._request("DELETE", f"{ENVIRONMENTS}/{name}", body=options)
        except ApiException as err:
            if err.status in (404, 409):
                return
            raise _wrap(err, f"deleting PreviewEnvironment {name}") from err

    # Objects a template renders into a preview namespace --------------------------------------------

    def served_kinds(self, api_version: str) -> dict[str, tuple[str, bool]] | None:
        """The kinds served under `api_version`, each as (plural, namespaced); None if it is not served."""
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        found = self._get(path, f"the API {api_version}")
        if found is None:
            return None
        resources = found.get("resources") or []
        return {r["kind"]: (r["name"], bool(r.get("namespaced"))) for r in resources if "/" not in r["name"]}

    @staticmethod
    def _objects_path(api_version: str, plural: str, namespace: str) -> str:
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        return f"{base}/namespaces/{namespace}/{plural}"

    def apply_object(self, body: Obj, plural: str, field_manager: str) -> Obj:
        """Server-side apply of one namespaced object, taking over fields other managers hold."""
        meta = body["metadata"]
        path = f"{self._objects_path(body['apiVersion'], plural, meta['namespace'])}/{meta['name']}"
        query = [("fieldManager", field_manager), ("force", "true")]
        try:
            return self._request("PATCH", path, body=body, query=query, content_type=APPLY_PATCH)
        except ApiException as err:
            raise _wrap(err, f"applying {body['kind']} {meta['name']}") from err

    def delete_object(self, api_version: str, plural: str, namespace: str, name: str) -> None:
        """Delete one namespaced object (its dependents in the background); a missing one is fine."""
        path = f"{self._objects_path(api_version, plural, namespace)}/{name}"
        try:
            self._request("DELETE", path, body={"propagationPolicy": "Background"})
        except ApiException as err:
            if err.status == 404:
                return
            raise _wrap(err, f"deleting {plural} {namespace}/{name}") from err

    def list_objects(self, api_version: str, plural: str, namespace: str) -> list[Obj]:
        """Every object of one kind in a namespace."""
        return list(self._pages(self._objects_path(api_version, plural, namespace), f"{plural} in {namespace}"))

    def list_templates(self) -> Iterator[Obj]:
        """Every PreviewTemplate."""
        return self._pages(TEMPLATES, "PreviewTemplates")

    # ConfigMaps (the webhook's closed-PR records, in its own namespace) ----------------------------

    def get_config_map(self, namespace: str, name: str) -> Obj | None:
        return self._get(f"/api/v1/namespaces/{namespace}/configmaps/{name}", f"ConfigMap {namespace}/{name}")

    def create_config_map(self, body: Obj) -> None:
        """Create it; a KubeError with status 409 if one of that name exists."""
        meta = body["metadata"]
        try:
            self._request("POST", f"/api/v1/namespaces/{meta['namespace']}/configmaps", body=body)
        except ApiException as err:
            raise _wrap(err, f"creating ConfigMap {meta['namespace']}/{meta['name']}") from err

    def replace_config_map(self, body: Obj) -> None:
        """Replace it; with metadata.resourceVersion set, a KubeError with status 409 if it changed since."""
        meta = body["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/configmaps/{meta['name']}"
        try:
            self._request("PUT", path, body=body)
        except ApiException as err:
            raise _wrap(err, f"replacing ConfigMap {meta['namespace']}/{meta['name']}") from err

    def patch_config_map(self, namespace: str, name: str, patch: Obj) -> None:
        """A JSON merge patch (a null removes a key); a KubeError with status 404 if it does not exist."""
        path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        try:
            self._request("PATCH", path, body=patch, content_type=MERGE_PATCH)
        except ApiException as err:
            raise _wrap(err, f"patching ConfigMap {namespace}/{name}") from err

    def watch_config_map(self, namespace: str, name: str, timeout: int) -> Iterator[tuple[str, Obj]]:
        """(event type, object) for one ConfigMap, from a watch that lists it first (ADDED) and ends after
        `timeout` seconds; read it in a thread of its own (it blocks)."""
        api = client.CoreV1Api(self.api_client)
        stream = watch.Watch().stream(
            api.list_namespaced_config_map,
            namespace,
            field_selector=f"metadata.name={name}",
            timeout_seconds=timeout,
            _request_timeout=timeout + 10,
        )
        try:
            for event in stream:
                obj = event["object"]
                yield (
                    str(event["type"]),
                    obj if isinstance(obj, dict) else self.api_client.sanitize_for_serialization(obj),
                )
        except ApiException as err:
            raise _wrap(err, f"watching ConfigMap {namespace}/{name}") from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise KubeError(
                f"watching ConfigMap {namespace}/{name}: Kubernetes API unreachable: {err}", status=0
            ) from err

    def get_peering(self, name: str) -> Obj | None:
        """kopf's ClusterKopfPeering object: the live replicas and their priorities."""
        return self._get(f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}", f"ClusterKopfPeering {name}")

    def create_event(self, ref: Obj, type_: str, reason: str, message: str, component: str) -> None:
        """Post a Kubernetes Event about a cluster-scoped object (kept in `default`, as kubectl looks)."""
        now = datetime.datetime.now(datetime.UTC).isoformat()
        meta = ref["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": "default"},
            "involvedObject": {
                "apiVersion": ref["apiVersion"],
                "kind": ref["kind"],
                "name": meta["name"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": component},
            "reportingComponent": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._request("POST", "/api/v1/namespaces/default/events", body=body)
        except ApiException as err:
            raise _wrap(err, f"posting an Event about {meta['name']}") from err

    # Namespace contents (for reporting what blocks a deletion) -------------------------------------

    def namespace_blockers(self, namespace: str) -> list[str]:
        """A short list of Ephemera's own objects still in a terminating namespace, as `Kind/name`.

        Not pods: the operator may not read pods at all (RBAC cannot limit that to its namespaces),
        and the namespace's status conditions already count what else remains."""
        found: list[str] = []
        kinds = {kind: self._child_path(kind, namespace) for kind in CHILD_PATHS}
        for kind, path in kinds.items():
            try:
                data = self._request("GET", path)
            except ApiException:
                continue
            found += [f"{kind}/{item['metadata']['name']}" for item in data.get("items") or []]
        return found
