"""The in-process backend's API keys: lost on restart (keys made with POST /keys)."""

from __future__ import annotations

from service.auth.keys import ApiKey


class MemoryKeys:
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
