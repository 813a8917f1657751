"""Authentication before the body: an ASGI gate in front of FastAPI.

FastAPI resolves a route's dependencies (the key check among them) only after it has read
and parsed the request body, so without a gate a client with no key could make the
service read, hold and parse a 12 MB body before its 401 (measured: about 1 s of work per
request, /healthz p50 5.7 ms -> 1,280 ms under two such clients). The gate runs before
any of that. When the request's operation declares the API key scheme in the OpenAPI
schema (the routes' own ``Ingest``/``Reader``/``Admin`` dependencies put it there), the
gate authenticates the ``Authorization`` header there and then: no key, or an unknown one,
is a 401 from the headers alone, the body never read (a small one is discarded, a large
one closes the connection: ``KEEP_ALIVE_BODY_BYTES``). A known key's principal goes on
with the request (``principal``), and the route's dependencies check scope and tenant
exactly as before, without a second lookup.

Operations without the scheme (/healthz, /readyz, /metrics unless TSAD_METRICS_AUTH) and
paths outside the schema (/docs, 404s, 405s) pass through untouched: none reads a body.
The schema is the one source: what it declares keyed is what the gate guards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth.guard import Authenticator, Principal
from service.errors import ServiceError
from service.http import error_response, path_pattern
from service.limits import content_length

_PRINCIPAL = "tsad.principal"  # key of the request's principal in the ASGI scope's state


def principal(scope: Scope) -> Principal | None:
    """The principal the gate authenticated for this request (None: it did not)."""
    return scope.get("state", {}).get(_PRINCIPAL)


def presented_key(scope: Scope) -> str | None:
    """The bearer credential of the request's Authorization header, as HTTPBearer reads
    it (scheme case-insensitive); None when absent or not a bearer credential."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer":
                return None
            return credential.strip() or None
    return None


@dataclass(frozen=True)
class KeyedOperation:
    """An operation of the schema that declares the key. Its ``path`` (the template) is
    what the request metrics label a request the gate answers with."""

    path: str
    method: str
    pattern: re.Pattern[str]


def keyed_operations(schema: dict) -> list[KeyedOperation]:
    """The operations of an OpenAPI schema that declare a security requirement."""
    return [KeyedOperation(path, method.upper(), path_pattern(path))
            for path, operations in schema.get("paths", {}).items()
            for method, op in operations.items() if op.get("security")]


class AuthGate:
    """ASGI middleware: 401 (or 503 when the key store is down) before the body is read,
    for every operation the app's OpenAPI schema declares keyed (read at the first
    request, when every route is in)."""

    def __init__(self, app: ASGIApp, retry_after_seconds: int) -> None:
        self.app = app
        self.retry_after = retry_after_seconds
        self._keyed: list[KeyedOperation] | None = None

    def _operation(self, scope: Scope) -> KeyedOperation | None:
        if self._keyed is None:
            self._keyed = keyed_operations(scope["app"].openapi())
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope["method"]
        return next((op for op in self._keyed
                     if op.method == method and op.pattern.fullmatch(path)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operation = self._operation(scope) if scope["type"] == "http" else None
        if operation is None:
            await self.app(scope, receive, send)
            return
        auth: Authenticator = scope["app"].state.services.auth
        try:
            who = await auth.authenticate(presented_key(scope))
        except ServiceError as exc:  # 401; 503: the key store is down
            scope["route"] = operation  # the request metrics name the route, as before
            response = error_response(exc, self.retry_after)
            if _body_to_come(scope):  # never receive it: close instead (see below)
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[_PRINCIPAL] = who
        await self.app(scope, receive, send)


# The body of a refused request is never read. After the answer, a kept-alive connection
# would still have to receive it (the server discards it, but every byte goes through the
# socket and the parser: 4 clients sending 12 MB bodies made /healthz p50 62 ms), so a
# body larger than this, or of unknown length (chunked), closes the connection instead.
# Up to it, the connection stays open: a small body costs nothing to discard, and a client
# still sending it when the server closes could lose the answer to the reset.
KEEP_ALIVE_BODY_BYTES = 65_536


def _body_to_come(scope: Scope) -> bool:
    declared = content_length(scope)
    if declared is None:
        return any(name == b"transfer-encoding" for name, _ in scope["headers"])
    return declared > KEEP_ALIVE_BODY_BYTES
