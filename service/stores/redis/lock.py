"""A stream's lock on Redis: a lease, not a mutex. Its holder renews it every third of
the lease while it works, so a crashed holder's lock lapses within one lease and every
replica can take the stream on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisError

from service.errors import StoreUnavailable
from service.stores.redis.connection import RedisConnection
from service.stores.redis.scripts import RENEW, UNLOCK

log = logging.getLogger("tsad.store")


class LeaseLock:
    def __init__(self, conn: RedisConnection, *, lease_seconds: float = 5.0,
                 wait_seconds: float = 10.0, part: str = "lock") -> None:
        self.conn = conn
        self.part = part  # the key: <prefix>:{<stream>}:<part>, in the stream's slot
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds
        self._unlock = conn.client.register_script(UNLOCK)
        self._renew = conn.client.register_script(RENEW)

    @asynccontextmanager
    async def __call__(self, stream: str) -> AsyncIterator[None]:
        key, token = self.conn.stream_key(stream, self.part), secrets.token_hex(8)
        lease_ms = int(self.lease_seconds * 1000)
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.002
        while not await self.conn.call(self.conn.client.set(key, token, nx=True,
                                                             px=lease_ms)):
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"stream {stream!r} is busy (lock wait timed out)")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        heartbeat = asyncio.create_task(self._hold(stream, key, token, lease_ms))
        try:
            yield
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            with contextlib.suppress(RedisError):  # the lease expires by itself
                await self._unlock(keys=[key], args=[token])

    async def _hold(self, stream: str, key: str, token: str, lease_ms: int) -> None:
        """Renew the lease while its holder is alive; stop if another holder has it."""
        while True:
            await asyncio.sleep(lease_ms / 3000)
            try:
                if not await self._renew(keys=[key], args=[token, lease_ms]):
                    log.warning("stream lock lost: its lease ran out before renewal",
                                extra={"stream": stream})
                    return
            except (RedisError, OSError) as exc:  # unreachable now: try next period
                log.warning("stream lock renewal failed", extra={"stream": stream,
                                                                 "error": str(exc)})
