"""One Redis connection shared by the Redis backend's parts: the client (a single Redis
or a Redis Cluster), its errors as StoreUnavailable, and the key names.

Keys of one stream carry the stream's hash tag (``<prefix>:{<stream>}:<part>``), so they
live in one Redis Cluster slot and one Lua script or MULTI may touch them together.
Alerts and webhooks share another slot on a cluster (``<prefix>:{alerts}:<part>``; a
single Redis keeps the plain names ``<prefix>:<part>``), API keys and the stream index
are single keys (``<prefix>:apikeys``, ``<prefix>:streams``). The watches of the ingest
doors share a slot whose tag no stream id can take (``<prefix>:{~watches}:<part>``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import StoreUnavailable
from service.redaction import redact_url


class _Connection(Connection):
    """redis-py's connection, its commands packed by hiredis (in C) where installed: the
    Python packer and its per-argument encoder were about a sixth of a batch-1 request's
    CPU on the client side (three script calls of 10 to 25 arguments each;
    benchmarks/results/request_cost.md). Arguments as redis-py's own encoder takes them:
    str (UTF-8), bytes, int, float (shortest repr)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if _pack is None:
            return super().pack_command(*args)
        if isinstance(args[0], str):  # a command name of several words: apart, as redis-py
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        try:  # as they come (memoryview included): no pass over the arguments
            return [_pack(args)]
        except TypeError:  # a bytearray, or a type hiredis does not pack
            pass
        try:
            return [_pack(tuple(bytes(a) if isinstance(a, memoryview | bytearray) else a
                                for a in args))]
        except TypeError:  # a type hiredis does not pack: redis-py's encoder says why
            return super().pack_command(*args)


try:
    from hiredis import pack_command as _pack
except ImportError:  # redis-py's own packer
    _pack = None


class _WaitingPool(aioredis.ConnectionPool):
    """redis-py's pool of at most ``max_connections``, where a command that finds them all
    in use waits for one, in turn (up to ``timeout`` seconds, then redis-py's "No
    connection available."), instead of failing with "Too many connections". Unlike
    redis-py's BlockingConnectionPool, a command that finds a connection free takes it
    without going through a lock and a timer: that pool cost about 15 us more per
    command at 8 concurrent requests (71-81 against 56-65 us of client CPU)."""

    def __init__(self, *args: Any, timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self._free = asyncio.Condition()
        self._waiting = 0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if not self._waiting and self.can_get_connection():
            with contextlib.suppress(MaxConnectionsError):  # taken meanwhile: wait below
                return await super().get_connection()
        async with self._free:
            self._waiting += 1
            try:
                async with asyncio.timeout(self.timeout):
                    while True:
                        await self._free.wait_for(self.can_get_connection)
                        with contextlib.suppress(MaxConnectionsError):
                            return await super().get_connection()
            except TimeoutError:
                raise RedisConnectionError("No connection available.") from None
            finally:
                self._waiting -= 1

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        if self._waiting:
            async with self._free:
                self._free.notify()


def connect(url: str, *, cluster: bool = False, timeout_seconds: float = 2.0,
            max_connections: int = 128,
            pool_wait_seconds: float = 10.0) -> aioredis.Redis | RedisCluster:
    """A client of one Redis, or of a Redis Cluster that ``url`` names one node of (the
    client finds the others and routes each command to its key's slot).

    On one Redis the client's connections are a pool of ``max_connections``: a command
    that finds them all busy waits for one (up to ``pool_wait_seconds``) instead of
    failing. redis-py's default pool raises "Too many connections" past 100, which a
    burst of concurrent requests met as 503s."""
    options: dict[str, Any] = {"socket_timeout": timeout_seconds,
                               "socket_connect_timeout": timeout_seconds,
                               "health_check_interval": 15}
    if cluster:
        return RedisCluster.from_url(url, **options)
    pool = _WaitingPool.from_url(url, max_connections=max_connections,
                                 timeout=pool_wait_seconds, connection_class=_Connection,
                                 **options)
    return aioredis.Redis.from_pool(pool)  # the client closes its pool with it


class RedisConnection:
    def __init__(self, url: str, *, prefix: str = "tsad", cluster: bool = False,
                 timeout_seconds: float = 2.0, max_connections: int = 128,
                 pool_wait_seconds: float = 10.0) -> None:
        self.url = url
        self.prefix = prefix
        self.cluster = cluster
        self.timeout_seconds = timeout_seconds
        self.client = connect(url, cluster=cluster, timeout_seconds=timeout_seconds,
                              max_connections=max_connections,
                              pool_wait_seconds=pool_wait_seconds)
        self._shared_tag = "{alerts}:" if cluster else ""  # alerts and webhooks: one slot
        # a cluster client reads the slot map once, before any command: concurrent first
        # commands on an uninitialised client race on its connections (redis-py 8)
        self._ready = not cluster
        self._initialising = asyncio.Lock()

    async def _initialise(self) -> None:
        async with self._initialising:
            if not self._ready:
                await self.client.initialize()
                self._ready = True

    async def ready(self) -> None:
        """Read a cluster's slot map if not yet done. Before a MULTI pipeline is built:
        a cluster pipeline built on a client that has not read it fails (redis-py 8)."""
        if not self._ready:
            with self._unavailable():
                await self._initialise()

    async def call(self, coro: Awaitable[Any]) -> Any:
        """Await a Redis command; an outage or a Redis error is StoreUnavailable (503)."""
        try:
            await self.ready()
        except BaseException:
            getattr(coro, "close", lambda: None)()  # never to be awaited
            raise
        with self._unavailable():
            return await coro

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(  # the URL may carry the password: never shown
                f"Redis unreachable at {redact_url(self.url)}: {exc}") from exc
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    def stream_key(self, stream: str, part: str) -> str:
        return self.slot_key(stream, part)

    def slot_key(self, tag: str, part: str) -> str:
        """A key in ``tag``'s hash slot: keys of one tag may share a script or MULTI."""
        return f"{self.prefix}:{{{tag}}}:{part}"

    def shared_key(self, part: str) -> str:
        """Alerts' and webhooks' keys (one hash slot on a cluster)."""
        return f"{self.prefix}:{self._shared_tag}{part}"

    def key(self, part: str) -> str:
        """A single key outside any stream's or the alerts' slot."""
        return f"{self.prefix}:{part}"

    def pipeline(self, transaction: bool = True) -> Any:
        return self.client.pipeline(transaction=transaction)

    async def ping(self) -> None:
        await self.call(self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
