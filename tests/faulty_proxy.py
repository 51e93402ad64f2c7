"""An HTTP proxy in front of a real server that answers some requests with an error of its choosing."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Fault = Callable[[str, bytes], tuple[int, bytes] | None]


class FaultyProxy:
    """Forwards every request to ``upstream`` unless ``fault(path, body)`` returns ``(status, body)``."""

    def __init__(self, upstream: str, fault: Fault) -> None:
        target = urlsplit(upstream)
        host, port = target.hostname or "127.0.0.1", target.port or 80

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                injected = fault(self.path, body)
                if injected is not None:
                    status, payload, headers = injected[0], injected[1], {"Content-Type": "application/json"}
                else:
                    upstream_conn = http.client.HTTPConnection(host, port, timeout=60)
                    sent = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    upstream_conn.request(self.command, self.path, body=body or None, headers=sent)
                    response = upstream_conn.getresponse()
                    status, payload = response.status, response.read()
                    headers = {k: v for k, v in response.getheaders() if k.lower() in ("content-type",)}
                    upstream_conn.close()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
