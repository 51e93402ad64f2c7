"""A TCP relay for deployment tests: it can cut connections in the middle of a transfer, and it can act as
an HTTP CONNECT proxy (what ``https_proxy`` points at)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class TcpProxy:
    """Relays connections to ``upstream`` (``host:port``), or to the target of each CONNECT request when
    ``upstream`` is empty. ``cut(connection_number, bytes_so_far)`` returning True closes that connection."""

    def __init__(self, upstream: str = "", cut: Callable[[int, int], bool] | None = None) -> None:
        self.upstream = upstream
        self.cut = cut or (lambda number, count: False)
        self.connections = 0
        self.cuts = 0
        self.connect_targets: list[str] = []
        self.answer = b"HTTP/1.1 200 Connection established"  # to a CONNECT request
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        """Stop taking connections (the relayed ones end when either side closes)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (closing alone does not)
        self._listener.close()
        self._acceptor.join(timeout=10)
        assert not self._acceptor.is_alive(), "the proxy still accepts connections"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(client, number), daemon=True).start()

    def _serve(self, client: socket.socket, number: int) -> None:
        target = self.upstream
        if not target:  # an HTTP CONNECT proxy
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = client.recv(4096)
                if not chunk:
                    client.close()
                    return
                request += chunk
            target = request.split(b" ")[1].decode()
            with self._lock:
                self.connect_targets.append(target)
            client.sendall(self.answer + b"\r\n\r\n")
            if b" 200 " not in self.answer:
                client.close()
                return
        host, _, port = target.rpartition(":")
        try:
            server = socket.create_connection((host, int(port)))
        except OSError:
            client.close()
            return
        counted = [0]
        sockets = (client, server)
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=self._pipe, args=(source, sink, number, counted, sockets), daemon=True).start()

    def _pipe(
        self,
        source: socket.socket,
        sink: socket.socket,
        number: int,
        counted: list[int],
        sockets: tuple[socket.socket, ...],
    ) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    counted[0] += len(data)
                    cut = self.cut(number, counted[0])
                    if cut:
                        self.cuts += 1
                if cut:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for each in sockets:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()
