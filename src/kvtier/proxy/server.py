"""Run the proxy's app with uvicorn on a background thread (tests, ``kvtier proxy``)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from kvtier.proxy.app import Proxy, create_app

START_TIMEOUT_S = 30.0


class ProxyServer:
    """A started proxy; ``server_address`` is where it listens, ``shutdown()`` stops it."""

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))  # OSError when the port is taken
        except OSError:
            self._socket.close()
            raise
        self.server_address: tuple[str, int] = self._socket.getsockname()[:2]
        config = uvicorn.Config(create_app(proxy), log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="kvtier-proxy", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the kvtier proxy did not start (see the log above)")
            time.sleep(0.01)

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def wait(self) -> None:
        """Block until the server stops."""
        self._thread.join()


def serve(proxy: Proxy, host: str, port: int) -> ProxyServer:
    """Start serving on a daemon thread; OSError when the port is taken."""
    return ProxyServer(proxy, host, port)
