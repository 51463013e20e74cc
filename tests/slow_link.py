"""A bandwidth-limited loopback TCP link for fault tests: ``SlowLink(port, bytes_per_s)`` listens on
a free loopback port and relays every connection to ``127.0.0.1:port``, passing at most
``bytes_per_s`` each way (in slices of 1/50 s), like a congested or far-away network.
Real servers stay real: only the path to them is slow."""

from __future__ import annotations

import socket
import threading
import time


class SlowLink:
    def __init__(self, target_port: int, bytes_per_s: int) -> None:
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="slow-link", daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def close(self) -> None:
        """Stop listening and cut every relayed connection."""
        self._closed = True
        self._listener.close()
        for sock in list(self._sockets):
            _close(sock)

    def __enter__(self) -> "SlowLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        slice_bytes = max(1, self.bytes_per_s // 50)
        try:
            while True:
                data = source.recv(slice_bytes)
                if not data:
                    break
                target.sendall(data)
                time.sleep(len(data) / self.bytes_per_s)
        except OSError:
            pass
        _close(source)
        _close(target)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
