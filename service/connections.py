"""Connection guards for uvicorn: a deadline and a size cap on every request head.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and times nothing
else: a client that connects and sends nothing, or half a request line and some headers,
and then stalls, holds its connection (a file descriptor, the protocol's buffers) for as
long as it likes, and httptools (llhttp) puts no bound on the size of a head. Bodies are
guarded per request by the ASGI middleware (``service/limits.py``: 413 and 408); the head
comes before any ASGI request exists, so it is guarded here, in the protocol.

``GuardedHttpToolsProtocol`` is uvicorn's httptools protocol with a timer armed when a
connection opens and when a request's first byte arrives: the head must be complete
within ``TSAD_HEADER_TIMEOUT_SECONDS``, else the server answers 408 and closes. A head
over ``TSAD_MAX_HEADER_BYTES`` is a 431 and the connection closes. Run it with
``uvicorn --http service.connections:GuardedHttpToolsProtocol`` (``tsad serve`` and
``service/process.py`` do).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import get_settings

log = logging.getLogger("tsad.connections")

PROTOCOL = "service.connections:GuardedHttpToolsProtocol"
_END = b"\r\n\r\n"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()  # the app's own settings object (same process, same env)
        self.header_timeout = settings.header_timeout_seconds
        self.max_header_bytes = settings.max_header_bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._reading_head = False
        self._head_bytes = 0
        self._tail = b""  # last bytes of the previous chunk: the end of a head may straddle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()  # a connection that never sends a byte is timed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._reading_head and self._between_requests():
            self._start_head()  # the first bytes of the next request: time and count them
        if self._reading_head:
            seen = self._tail + data
            end = seen.find(_END)
            # bytes of this chunk that belong to the head (the rest is body)
            part = len(data) if end < 0 else max(0, end + len(_END) - len(self._tail))
            if self._head_bytes + part > self.max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large",
                             f"request head larger than {self.max_header_bytes} bytes "
                             "(TSAD_MAX_HEADER_BYTES)")
                return
            self._head_bytes += part
            self._tail = seen[-(len(_END) - 1):]
        super().data_received(data)

    # httptools parser callbacks (uvicorn's own, extended)
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._reading_head:  # a pipelined request begins inside a chunk
            self._start_head()

    def on_headers_complete(self) -> None:
        self._stop_head()
        super().on_headers_complete()

    def _between_requests(self) -> bool:
        cycle = self.cycle
        return cycle is None or (cycle.response_complete and not cycle.more_body
                                 and not self.pipeline)

    def _start_head(self) -> None:
        self._stop_head()
        self._reading_head, self._head_bytes, self._tail = True, 0, b""
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _stop_head(self) -> None:
        self._reading_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(408, "Request Timeout",
                     f"request headers not received within {self.header_timeout:g} s "
                     "(TSAD_HEADER_TIMEOUT_SECONDS)")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._stop_head()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined request is still being answered: never write into its response;
            # the connection closes once it is sent, dropping the stalled head
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        log.debug("connection refused", extra={"status": status, "client": self.client})
        body = json.dumps({"message": message, "detail": None}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()
