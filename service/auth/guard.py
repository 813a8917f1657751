"""Who is calling, and may they: keys to principals, scopes and tenants, open mode.

Scopes: ``ingest`` (POST /score), ``read`` (GET of streams and alerts), ``admin``
(configure and delete streams, feedback, webhooks, keys; implies the other two). A key
with a tenant only touches streams whose id starts with ``<tenant>.``; webhooks and keys
concern every tenant, so they need an admin key without tenant.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass

from service.auth.keys import SCOPES, Scope, digest, key_id
from service.errors import Forbidden, Unauthenticated
from service.settings import Settings
from service.stores.base import KeyStore

log = logging.getLogger("tsad.auth")


@dataclass(frozen=True)
class Principal:
    key_id: str  # "open" when auth is off, "bootstrap" for TSAD_ADMIN_KEY
    scopes: tuple[str, ...]
    tenant: str | None = None

    def has(self, scope: Scope) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def owns(self, stream: str) -> bool:
        return self.tenant is None or stream.startswith(f"{self.tenant}.")

    def check_stream(self, stream: str) -> None:
        if not self.owns(stream):
            raise Forbidden(f"key {self.key_id} belongs to tenant {self.tenant!r}: "
                            f"stream ids must start with '{self.tenant}.', not {stream!r}")

    def check_global(self, what: str) -> None:
        if self.tenant is not None:
            raise Forbidden(f"{what} concern every tenant: this needs a key without "
                            f"tenant (key {self.key_id} belongs to {self.tenant!r})")


OPEN = Principal("open", SCOPES)


class Authenticator:
    def __init__(self, settings: Settings, keys: KeyStore) -> None:
        self.open = settings.auth == "open"
        self.keys = keys
        admin = settings.admin_key
        self._bootstrap = digest(admin.get_secret_value()) if admin else None
        ingest = settings.ingest_key  # TSAD_INGEST_KEY: Prometheus' remote_write (issue 26)
        self._ingest = digest(ingest.get_secret_value()) if ingest else None

    async def authenticate(self, raw: str | None) -> Principal:
        """The principal a presented key stands for; 401 when there is none or it is
        unknown (revoked keys are unknown: their record is gone)."""
        if self.open:
            return OPEN
        if not raw:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        if self._bootstrap and hmac.compare_digest(self._bootstrap, digest(raw)):
            return Principal("bootstrap", SCOPES)
        if self._ingest and hmac.compare_digest(self._ingest, digest(raw)):
            return Principal("bootstrap-ingest", ("ingest",))
        kid = key_id(raw)
        record = await self.keys.get(kid) if kid else None
        if record is None or not record.matches(raw):
            raise Unauthenticated("unknown or revoked API key")
        return Principal(record.id, tuple(record.scopes), record.tenant)

    @staticmethod
    def require(principal: Principal, scope: Scope) -> Principal:
        if not principal.has(scope):
            raise Forbidden(f"key {principal.key_id} lacks the {scope!r} scope "
                            f"(it has: {', '.join(principal.scopes)})")
        return principal


def is_loopback(host: str) -> bool:
    """An address only this machine reaches.

    >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.2")]
    [True, True, True, False, False]
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(settings: Settings) -> str | None:
    """Why the service must not start as configured (None: it may). Open mode is for a
    loopback address only, unless allow_open says otherwise."""
    if settings.auth == "open" and not is_loopback(settings.host) and not settings.allow_open:
        return (f"refusing to serve {settings.host}:{settings.port} without authentication: "
                "set TSAD_AUTH=keys (with TSAD_ADMIN_KEY or `tsad keys create`), bind "
                "127.0.0.1, or set TSAD_ALLOW_OPEN=true to accept an open service")
    return None


def warn_if_open(settings: Settings) -> None:
    if settings.auth == "open":
        log.warning("authentication is OFF (TSAD_AUTH=open): anyone who reaches "
                    f"{settings.host}:{settings.port} may score, read, delete streams and "
                    "subscribe webhooks; set TSAD_AUTH=keys outside a developer machine",
                    extra={"auth": "open", "host": settings.host})
