"""A TCP proxy on loopback that makes a fast link slow: a bandwidth cap on what the server sends
back, and a switch that black-holes the link (bytes are read and dropped, nothing is answered,
connections stay open, as with a dead route). For benchmarks and tests of the remote tier under
a slow or failing network; it runs an asyncio loop on a daemon thread of the calling process.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

_READ_BYTES = 16 << 10


@dataclass
class LinkSettings:
    """What the link does now; changed at run time by the proxy's owner."""

    rate_bytes_per_s: float = 0.0  # server -> client; 0 = unlimited
    blackhole: bool = False


class ThrottlingProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` with ``settings`` applied."""

    def __init__(self, target_host: str, target_port: int, settings: LinkSettings | None = None) -> None:
        self.settings = settings or LinkSettings()
        self.bytes_to_client = 0
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, name="kvtier-throttle", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the throttling proxy did not start")
        assert self._server is not None
        self.port: int = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop serving and drop every connection."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(self._pump(client_reader, server_writer, throttled=False),
                                 self._pump(server_reader, client_writer, throttled=True), return_exceptions=True)
        except asyncio.CancelledError:
            pass  # closing the proxy
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, throttled: bool) -> None:
        while True:
            data = await reader.read(_READ_BYTES)
            if not data:
                writer.close()
                return
            if self.settings.blackhole:
                continue  # dropped: the other side waits for an answer that never comes
            if throttled and self.settings.rate_bytes_per_s > 0:
                await asyncio.sleep(len(data) / self.settings.rate_bytes_per_s)
            writer.write(data)
            await writer.drain()
            if throttled:
                self.bytes_to_client += len(data)

