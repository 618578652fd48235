"""A TLS proxy in front of the local API server whose watch streams lag a fixed time behind.

Under a burst the operator's watch falls seconds behind its own writes; this reproduces that on a
quiet machine, for one operator pointed at the proxy. Every request is forwarded at once with the
control plane's admin credentials; the chunks of a watch response are each held back `lag` seconds
from when they came (a constant lag, in order, not a growing one). For tests only: it trusts anyone
who reaches its loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from devtools.controlplane import ControlPlane, free_port, write_kubeconfig

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


class LaggingProxy:
    def __init__(self, plane: ControlPlane, lag: float) -> None:
        self.plane = plane
        self.lag = lag
        self.port = free_port()
        self.pki = plane.state_dir / "pki"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="lagging-proxy", daemon=True)

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for the proxy (the API server's own CA: the proxy serves its certificate)."""
        write_kubeconfig(path, f"https://127.0.0.1:{self.port}", self.pki, "admin")
        return path

    def start(self) -> LaggingProxy:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the lagging proxy did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        upstream = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        upstream.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.load_cert_chain(self.pki / "apiserver.crt", self.pki / "apiserver.key")
        async with ClientSession(
            connector=TCPConnector(ssl=upstream, limit=0), timeout=ClientTimeout(total=None), auto_decompress=False
        ) as session:
            app = web.Application(client_max_size=64 * 2**20)

            async def forward(request: web.Request) -> web.StreamResponse:
                return await self._forward(session, request)

            app.router.add_route("*", "/{path:.*}", forward)
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=serving).start()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    async def _forward(self, session: ClientSession, request: web.Request) -> web.StreamResponse:
        url = f"https://127.0.0.1:{self.plane.api_port}{request.rel_url}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read() or None  # no body, not an empty one: a GET with a type is refused (415)
        async with session.request(request.method, url, headers=headers, data=body) as answer:
            out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
            if request.query.get("watch") not in ("true", "1"):
                return web.Response(status=answer.status, headers=out_headers, body=await answer.read())
            response = web.StreamResponse(status=answer.status, headers=out_headers)
            response.enable_chunked_encoding()
            await response.prepare(request)
            await self._delayed(answer.content.iter_any(), response)
            return response

    async def _delayed(self, chunks: AsyncIterator[bytes], response: web.StreamResponse) -> None:
        """Copy the chunks, each sent `lag` seconds after it came: one reader, one writer, a queue."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for chunk in chunks:
                    await queue.put((time.monotonic(), chunk))
            finally:
                await queue.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                came, chunk = item
                await asyncio.sleep(max(0.0, came + self.lag - time.monotonic()))
                await response.write(chunk)
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away (an operator stopping, a watch it restarts)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


@contextlib.contextmanager
def lagging(plane: ControlPlane, lag: float) -> Iterator[LaggingProxy]:
    proxy = LaggingProxy(plane, lag).start()
    try:
        yield proxy
    finally:
        proxy.stop()
