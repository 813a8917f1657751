"""Request body limits, as ASGI middleware: a size cap and a read deadline.

Both are enforced before a body is held whole. A declared ``Content-Length`` over the cap
is answered 413 without reading a byte; a chunked (or lying) body is counted as it
streams, and the request fails with 413 the moment it passes the cap. A body that has not
fully arrived ``timeout`` seconds after the headers is a 408: uvicorn only times out idle
keep-alive connections, so without this a client that sends half a body holds its
connection (and the request's buffers) forever.

The errors are raised from ``receive`` as ``HTTPException``: FastAPI's body parsing lets
an ``HTTPException`` through unchanged (any other error becomes a generic 400), so the
app's own handler answers them in the usual ``{"message", "detail"}`` shape.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body larger than {limit} bytes "
                         "(TSAD_MAX_BODY_BYTES)", headers={"Connection": "close"})


def too_slow(timeout: float) -> HTTPException:
    return HTTPException(408, f"request body not received within {timeout:g} s "
                         "(TSAD_BODY_TIMEOUT_SECONDS)", headers={"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > self.max_bytes:
            err = too_large(self.max_bytes)
            await error_response(err)(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout
        received = 0
        done = False

        async def limited() -> Message:
            nonlocal received, done
            if done:  # body complete: later receives wait for a disconnect, untimed
                return await receive()
            try:  # a timer on this task: wait_for would start a task per receive
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                raise too_slow(self.timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, limited, send)


def content_length(scope: Scope) -> int | None:
    """The request's declared Content-Length (None: not declared, e.g. chunked)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11/httptools reject these before the app runs
    return None


def error_response(err: HTTPException) -> JSONResponse:
    """``err`` as answered straight from ASGI middleware, in the app's error shape."""
    return JSONResponse({"message": err.detail, "detail": None},
                        status_code=err.status_code, headers=err.headers)
