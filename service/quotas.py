"""How many streams may exist: ``TSAD_MAX_STREAMS`` for the whole store, and
``TSAD_MAX_STREAMS_PER_TENANT`` for the streams of each tenant (ids ``<tenant>.*``) that
its keys create, so that one tenant's key cannot fill the store for every other tenant.

A stream is counted where it is created: ``POST /score`` creates it with its first points
(checked after the atomic append, which is undone when over), ``PUT /streams/{id}``
before it writes. A key without tenant (an operator's) is held to the store's cap only.
"""

from __future__ import annotations

from service.errors import LimitReached
from service.settings import Settings
from service.stores.base import Backend


async def check_room(backend: Backend, settings: Settings, tenant: str | None,
                     loc: tuple[str, ...], slack: int = 0) -> None:
    """LimitReached when more than the quota, less ``slack``, of streams exist: in the
    store, or (for a ``tenant``'s key) of the tenant's. ``slack=1`` before a stream is
    created (room for one more), 0 after (it is counted)."""
    if await _over(backend, settings.max_streams, slack):
        raise LimitReached(loc, f"at most {settings.max_streams} streams "
                           "(TSAD_MAX_STREAMS): delete one or raise the limit")
    quota = settings.max_streams_per_tenant
    if tenant is not None and await _over(backend, quota, slack, f"{tenant}."):
        raise LimitReached(loc, f"tenant {tenant!r} has its {quota} streams "
                           "(TSAD_MAX_STREAMS_PER_TENANT): delete one of its streams or "
                           "raise the limit")


async def _over(backend: Backend, quota: int, slack: int, prefix: str | None = None) -> bool:
    """More than ``quota - slack`` streams (of ids starting with ``prefix``)? The cheap
    count first; the exact one (which tidies streams expired by TTL out of the index) only
    past it. A quota of 0 is no limit."""
    if not quota:
        return False
    if await backend.streams.count(prefix=prefix) <= quota - slack:
        return False
    return await backend.streams.count(exact=True, prefix=prefix) > quota - slack
