"""API keys: issued once, kept only as a SHA-256 hash, looked up by their public id.

A key reads ``tsad_<id>_<secret>``: ``id`` (12 hex digits) finds the record, the secret
(32 random bytes) is what proves possession. Only ``sha256(key)`` is stored, compared in
constant time; a high-entropy random key needs no slow password hash. Records live in the
service's backend (``Backend.keys``): Redis when configured (every replica, and `tsad
keys`, see the same keys; revoking takes effect on the next request), else in the process.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

Scope = Literal["ingest", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin")
TENANT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_KEY = re.compile(r"^tsad_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")


def digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def key_id(raw: str) -> str | None:
    """The record id a presented key names, or None when it is not shaped like one."""
    m = _KEY.match(raw)
    return m.group(1) if m else None


@dataclass
class ApiKey:
    id: str
    name: str
    scopes: list[str]
    tenant: str | None
    hash: str  # sha256 hex of the whole key
    created_at: float = field(default_factory=time.time)

    def matches(self, raw: str) -> bool:
        return hmac.compare_digest(self.hash, digest(raw))

    def public(self) -> dict:
        d = asdict(self)
        d.pop("hash")
        return d


def new_key(name: str, scopes: list[str], tenant: str | None = None) -> tuple[str, ApiKey]:
    """(the key, shown once; its record, which holds only its hash)

    >>> raw, rec = new_key("ci", ["ingest"], "acme")
    >>> key_id(raw) == rec.id and rec.matches(raw) and raw not in str(rec)
    True
    """
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {scopes}")
    if tenant is not None and not re.match(TENANT_PATTERN, tenant):
        raise ValueError("tenant: 1-64 of A-Z a-z 0-9 _ -")
    kid = secrets.token_hex(6)
    raw = f"tsad_{kid}_{secrets.token_urlsafe(32)}"
    ordered = [s for s in SCOPES if s in scopes]
    return raw, ApiKey(id=kid, name=name, scopes=ordered, tenant=tenant, hash=digest(raw))


API_KEY_ENV = "TSAD_API_KEY"  # what the clients (`tsad replay`, `tsad receive`) send


def bearer(raw: str | None) -> dict[str, str]:
    """Request headers that present ``raw`` (none without a key: an open service)."""
    return {"Authorization": f"Bearer {raw}"} if raw else {}
