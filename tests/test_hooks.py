"""Result hooks: signed CloudEvents on every transition, received by a real HTTP server, in order, and
never holding up an environment."""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import hmac
import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from devtools.controlplane import ControlPlane, free_port
from devtools.support import Kubectl, Process, process_env, wait_for
from ephemera.api.models import parse_phase
from ephemera.config import Settings
from ephemera.hooks import CONTENT_TYPE, SIGNATURE_HEADER, Hooks, cloud_event
from ephemera.metrics import REGISTRY
from ephemera.transitions import Transition
from tests.conftest import db_upgrade, http_ok
from tests.test_operator import SHA_A, make_env, wait_phase

SECRET = "hook-secret-0123456789"


class Receiver:
    """An HTTP server in a thread of its own that records every request per path. A path answers
    `status[path]` (200 unless set), and only once `gate` is open when it is closed."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, list[tuple[dict[str, str], bytes]]] = {}
        self.arrived: dict[str, int] = {}  # requests that reached the handler, answered or not
        self.status: dict[str, int] = {}
        self.refuse_first: dict[str, int] = {}  # path -> how many requests get a 503 before it answers
        self._loop = asyncio.new_event_loop()
        self._gate = asyncio.Event()
        self._gate.set()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body = await request.read()
        self.arrived[path] = self.arrived.get(path, 0) + 1
        await self._gate.wait()
        status = self.status.get(path, 200)
        if self.refuse_first.get(path, 0) > 0:
            self.refuse_first[path] -= 1
            status = 503
        if status == 200:
            self.received.setdefault(path, []).append((dict(request.headers), body))
        return web.Response(status=status)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/{path}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()

    def start(self) -> Receiver:
        self._thread.start()
        self._started.wait(10)
        return self

    def close_gate(self) -> None:
        self._loop.call_soon_threadsafe(self._gate.clear)

    def open_gate(self) -> None:
        self._loop.call_soon_threadsafe(self._gate.set)

    def stop(self) -> None:
        self.open_gate()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def events(self, path: str) -> list[dict[str, Any]]:
        """The CloudEvents received on `path`, each checked for its signature and content type."""
        found = []
        for headers, body in list(self.received.get(path, [])):
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected), "a hook with a wrong signature"
            assert headers["Content-Type"] == CONTENT_TYPE
            found.append(json.loads(body))
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def transition(name: str, uid: str, old: str | None, phase: str, **status: Any) -> Transition:
    spec = {"repository": "octo-org/hooks", "pullRequest": 4, "commitSha": SHA_A}
    old_phase = parse_phase(old) if old else None
    at = "2026-01-01T00:00:00Z"
    return Transition(name, uid, 1, spec, old_phase, parse_phase(phase), f"{phase}Reason", f"now {phase}", at, status)


def test_the_cloud_event_of_a_transition() -> None:
    t = transition("pr-4-octo-org-hooks", "uid-1", "Provisioning", "Ready", url="https://pr-4.example.com/")
    event = cloud_event(t)
    assert event["specversion"] == "1.0"
    assert event["type"] == "dev.ephemera.environment.ready"
    assert event["source"] == "/apis/ephemera.dev/v1alpha1/previewenvironments/pr-4-octo-org-hooks"
    assert event["subject"] == "octo-org/hooks#4"
    assert event["datacontenttype"] == "application/json"
    assert datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00")) == t.occurred.replace(
        microsecond=t.occurred.microsecond // 1000 * 1000
    )
    assert event["data"] == {
        "name": "pr-4-octo-org-hooks",
        "phase": "Ready",
        "previousPhase": "Provisioning",
        "reason": "ReadyReason",
        "message": "now Ready",
        "url": "https://pr-4.example.com/",
        "commit": SHA_A,
        "repository": "octo-org/hooks",
        "pullRequest": 4,
    }
    # The id is the transition's: the same for every attempt, another for another transition.
    assert cloud_event(t)["id"] == event["id"]
    assert cloud_event(transition("pr-4-octo-org-hooks", "uid-1", "Ready", "Updating"))["id"] != event["id"]


def hook_settings(**values: Any) -> Settings:
    return Settings(hook_secret=SecretStr(SECRET), hook_retry_backoff=0.01, hook_retry_max_delay=0.05, **values)


def run_hooks(settings: Settings, urls: list[str], transitions: list[Transition], until: Any) -> Hooks:
    """Publish `transitions` to a Hooks engine on a loop of this test's own, until `until(hooks)` holds."""

    async def main() -> Hooks:
        hooks = Hooks(settings, lambda t: urls)
        hooks.start()
        try:
            for t in transitions:
                # From another thread, as kopf's handlers publish.
                await asyncio.to_thread(hooks.listener, t)
            deadline = asyncio.get_running_loop().time() + 30
            while not until(hooks):
                assert asyncio.get_running_loop().time() < deadline, "hooks not delivered in 30 s"
                await asyncio.sleep(0.02)
        finally:
            await hooks.stop()
        return hooks

    return asyncio.run(main())


def test_each_target_gets_an_environments_events_in_order_and_signed(receiver: Receiver) -> None:
    phases = ["Provisioning", "Ready", "Updating", "Ready", "Destroying", "Destroyed"]
    a = [transition("env-a", "uid-a", old, new) for old, new in zip([None, *phases], phases, strict=False)]
    b = [transition("env-b", "uid-b", old, new) for old, new in zip([None, *phases], phases, strict=False)]
    interleaved = [t for pair in zip(a, b, strict=True) for t in pair]
    # One answers 503 to its first requests: retried with the same body, and still in order.
    receiver.refuse_first["flaky"] = 5
    run_hooks(
        hook_settings(hook_max_attempts=100),
        [receiver.url("flaky"), receiver.url("steady")],
        interleaved,
        lambda hooks: hooks.pending() == 0,
    )
    for path in ("flaky", "steady"):
        events = receiver.events(path)
        for name in ("env-a", "env-b"):
            mine = [e for e in events if e["data"]["name"] == name]
            assert [e["data"]["phase"] for e in mine] == phases, (path, name)
            assert len({e["id"] for e in mine}) == len(phases)
    assert receiver.arrived["flaky"] == len(interleaved) + 5  # five refused, then sent again


def delivered(outcome: str) -> float:
    return REGISTRY.get_sample_value("ephemera_hook_deliveries_total", {"outcome": outcome}) or 0.0


def test_a_dead_target_is_dropped_after_n_attempts_and_counted(receiver: Receiver) -> None:
    dropped, refused = delivered("dropped"), delivered("refused")
    receiver.status["down"] = 503
    receiver.status["gone"] = 404
    nowhere = f"http://127.0.0.1:{free_port()}/hook"
    t = [transition("env-d", "uid-d", None, "Provisioning"), transition("env-d", "uid-d", "Provisioning", "Ready")]
    run_hooks(
        hook_settings(hook_max_attempts=3),
        [receiver.url("down"), receiver.url("gone"), nowhere, receiver.url("up")],
        t,
        lambda hooks: hooks.pending() == 0,
    )
    assert receiver.arrived["down"] == 3 * len(t)  # N attempts each, then the next event
    assert receiver.arrived["gone"] == len(t)  # a 4xx is a refusal: not retried
    assert delivered("dropped") - dropped == 2 * len(t)  # down and nowhere
    assert delivered("refused") - refused == len(t)
    assert [e["data"]["phase"] for e in receiver.events("up")] == ["Provisioning", "Ready"]


def test_a_hanging_target_delays_no_other_target(receiver: Receiver) -> None:
    hang = Receiver().start()
    hang.close_gate()
    try:
        t = [transition("env-h", "uid-h", None, "Provisioning"), transition("env-h", "uid-h", "Provisioning", "Ready")]
        run_hooks(
            hook_settings(hook_timeout=60),
            [hang.url("hook"), receiver.url("hook")],
            t,
            # Both targets' requests are sent at once, each served by a thread of its own: the hanging
            # one's may reach its handler after the other target has answered both.
            lambda hooks: len(receiver.received.get("hook", [])) == 2 and hang.arrived.get("hook") == 1,
        )
        assert hang.arrived == {"hook": 1}  # the first event waits there; the other target has both
    finally:
        hang.stop()


def test_hook_urls_need_a_secret_and_http_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPHEMERA_HOOK_URLS", "http://a.example/x, https://b.example:8443/y")
    with pytest.raises(ValueError, match="EPHEMERA_HOOK_SECRET"):
        Settings()
    monkeypatch.setenv("EPHEMERA_HOOK_SECRET", SECRET)
    assert Settings().hook_urls == ["http://a.example/x", "https://b.example:8443/y"]
    monkeypatch.setenv("EPHEMERA_HOOK_URLS", '["http://a.example/x"]')
    assert Settings().hook_urls == ["http://a.example/x"]
    monkeypatch.setenv("EPHEMERA_HOOK_URLS", "ftp://a.example/x")
    with pytest.raises(ValueError, match="not an http"):
        Settings()


# The operator sends them ---------------------------------------------------------------------------


def template(name: str, repository: str, hook: str) -> dict[str, Any]:
    return {
        "apiVersion": "ephemera.dev/v1alpha1",
        "kind": "PreviewTemplate",
        "metadata": {"name": name},
        "spec": {"repositories": [repository], "url": "https://{{ host }}/", "hooks": [{"url": hook}]},
    }


def test_the_operator_sends_a_prs_transitions_and_a_dead_target_does_not_delay_ready(
    operator_paused: None,
    control_plane: ControlPlane,
    crd: Path,
    kubectl: Kubectl,
    postgres: Any,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    repository = f"octo-org/hooks-{uuid.uuid4().hex[:6]}"
    template_name = f"hooks-{uuid.uuid4().hex[:6]}"
    kubectl.apply(template(template_name, repository, receiver.url("template")))
    env = process_env(
        control_plane.kubeconfig,
        tmp_path,
        EPHEMERA_DATABASE_URL=postgres.url,
        EPHEMERA_HOOK_URLS=f"{receiver.url('setting')},http://127.0.0.1:{free_port()}/refused",
        EPHEMERA_HOOK_SECRET=SECRET,
        EPHEMERA_HOOK_RETRY_BACKOFF="0.05",
        EPHEMERA_HOOK_MAX_ATTEMPTS="1000",
    )
    db_upgrade(env)
    proc = Process(["operator"], env, tmp_path / "operator.log", int(env["EPHEMERA_OPERATOR_PORT"])).start()
    try:
        wait_for(lambda: http_ok(proc, "/healthz"), timeout=60, what="operator /healthz")
        # Every target holds its answer: the one of the settings and the template's take the request and
        # answer nothing, the third refuses connections. The environment is Ready all the same.
        receiver.close_gate()
        name = f"hooks-{uuid.uuid4().hex[:6]}"
        kubectl.apply(make_env(name, 4, repo=repository))
        status = wait_phase(kubectl, name, "Ready")
        assert receiver.received == {}
        assert status["url"].startswith("https://")

        receiver.open_gate()
        phases = ["Provisioning", "Ready"]

        def count(path: str, n: int) -> bool:
            return len(receiver.events(path)) == n

        for path in ("setting", "template"):
            wait_for(functools.partial(count, path, 2), timeout=30, what=f"the {path} target's hooks")
        kubectl.run("delete", "pe", name, "--wait=false")
        phases += ["Destroying", "Destroyed"]
        for path in ("setting", "template"):
            wait_for(functools.partial(count, path, 4), timeout=60, what=f"the {path} target's hooks")
            events = receiver.events(path)
            assert [e["data"]["phase"] for e in events] == phases
            assert [e["type"] for e in events] == [f"dev.ephemera.environment.{p.lower()}" for p in phases]
            assert {e["subject"] for e in events} == {f"{repository}#4"}
            assert events[1]["data"]["url"] == status["url"]
            assert {e["data"]["commit"] for e in events} == {SHA_A}
            assert len({e["id"] for e in events}) == 4

        def retried() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/metrics", timeout=5) as answer:
                lines = answer.read().decode().splitlines()
            prefix = 'ephemera_hook_deliveries_total{outcome="retried"} '
            return next(float(line.removeprefix(prefix)) for line in lines if line.startswith(prefix))

        wait_for(lambda: retried() > 0, timeout=30, what="the refusing target's retries counted")
    finally:
        proc.stop()
        kubectl.run("delete", "previewtemplate", template_name, "--wait=false", check=False)
