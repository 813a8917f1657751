"""A real HTTP server on a free loopback port, for tests that need something to POST to
(webhook receivers, remote-write targets): one helper, so each test writes only what its
server answers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (path, headers, body) -> (status, response headers, response body)
Answer = tuple[int, dict[str, str], bytes]
OnPost = Callable[[str, HTTPMessage, bytes], Answer]


class LoopbackServer:
    """Serves POSTs on 127.0.0.1 in a daemon thread; each goes to ``on_post``.

    >>> import httpx
    >>> server = LoopbackServer(lambda path, headers, body: (202, {}, body[::-1]))
    >>> r = httpx.post(server.url("/x"), content=b"abc")
    >>> r.status_code, r.content
    (202, b'cba')
    >>> server.close()
    """

    def __init__(self, on_post: OnPost) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, headers, answer = on_post(self.path, self.headers, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
