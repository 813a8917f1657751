"""API keys: issued once, kept only as a SHA-256 hash, looked up by their public id.

A key reads ``tsad_<id>_<secret>``: ``id`` (12 hex digits) finds the record, the secret
(32 random bytes) is what proves possession. Only ``sha256(key)`` is stored, compared in
constant time; a high-entropy random key needs no slow password hash. Records live in the
service's store: Redis when configured (every replica, and `tsad keys`, see the same
keys; revoking takes effect on the next request), else in the process.

Redis keys:

    <prefix>:apikeys     hash: key id -> JSON record (hash, scopes, tenant; no key)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

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


class KeyStore(Protocol):
    async def add(self, key: ApiKey) -> None: ...
    async def get(self, kid: str) -> ApiKey | None: ...
    async def list(self) -> list[ApiKey]: ...
    async def revoke(self, kid: str) -> bool: ...


class MemoryKeyStore:
    """In process, like the in-memory window store: lost on restart."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKey] = {}

    async def add(self, key: ApiKey) -> None:
        self.keys[key.id] = key

    async def get(self, kid: str) -> ApiKey | None:
        return self.keys.get(kid)

    async def list(self) -> list[ApiKey]:
        return sorted(self.keys.values(), key=lambda k: k.created_at)

    async def revoke(self, kid: str) -> bool:
        return self.keys.pop(kid, None) is not None


class RedisKeyStore:
    """Shares the window store's connection and its error handling (503 on outage)."""

    def __init__(self, window_store) -> None:  # noqa: ANN001 - a RedisWindowStore
        self.ws = window_store
        self.redis = window_store._redis
        self.k_keys = f"{window_store.prefix}:apikeys"

    async def add(self, key: ApiKey) -> None:
        await self.ws._call(self.redis.hset(self.k_keys, key.id, json.dumps(asdict(key))))

    async def get(self, kid: str) -> ApiKey | None:
        raw = await self.ws._call(self.redis.hget(self.k_keys, kid))
        return ApiKey(**json.loads(raw)) if raw else None

    async def list(self) -> list[ApiKey]:
        raw = await self.ws._call(self.redis.hgetall(self.k_keys))
        return sorted((ApiKey(**json.loads(v)) for v in raw.values()),
                      key=lambda k: k.created_at)

    async def revoke(self, kid: str) -> bool:
        return bool(await self.ws._call(self.redis.hdel(self.k_keys, kid)))


def build_key_store(window_store) -> KeyStore:  # noqa: ANN001 - the raw window store
    if window_store.backend == "redis":
        return RedisKeyStore(window_store)
    return MemoryKeyStore()


API_KEY_ENV = "TSAD_API_KEY"  # what the clients (`tsad replay`, `tsad receive`) send


def bearer(raw: str | None) -> dict[str, str]:
    """Request headers that present ``raw`` (none without a key: an open service)."""
    return {"Authorization": f"Bearer {raw}"} if raw else {}
