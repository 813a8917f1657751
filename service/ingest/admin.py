"""Watches over the API (``/watches``): list, describe, create or change, delete. A
watch defined in TSAD_INGEST_CONFIG is read-only here; the runner (``watch.py``) picks
changes up, on every replica, within a few seconds."""

from __future__ import annotations

from service.errors import Conflict, LimitReached, NotFound
from service.ingest.watch import WatchIn, WatchList, WatchOut, WatchRunner
from service.settings import Settings
from service.stores.base import IngestStore


class WatchAdmin:
    def __init__(self, runner: WatchRunner, store: IngestStore, settings: Settings) -> None:
        self.runner = runner
        self.store = store
        self.settings = settings

    async def list(self) -> WatchList:
        specs = await self.runner.specs()
        return WatchList(watches=[await self._out(n, spec, source)
                                  for n, (spec, source) in sorted(specs.items())])

    async def get(self, name: str) -> WatchOut:
        specs = await self.runner.specs()
        if name not in specs:
            raise NotFound(f"no watch {name!r}")
        return await self._out(name, *specs[name])

    async def put(self, name: str, spec: WatchIn) -> tuple[WatchOut, bool]:
        """Create or change a watch; (the watch, created). A changed query or step goes
        on from the watch's last evaluated time."""
        s = self.settings
        if not s.prometheus_url:
            raise Conflict(None, "watches need TSAD_PROMETHEUS_URL (the Prometheus HTTP "
                           "API to query)")
        specs = await self.runner.specs()
        self._writable(name, specs, f"change it there ({s.ingest_config})")
        if name not in specs and len(specs) >= s.watch_max:
            raise LimitReached(("path", "name"), f"at most {s.watch_max} watches "
                               "(TSAD_WATCH_MAX)")
        created = await self.store.put_watch(name, spec.model_dump())
        await self.runner.sync()
        return await self._out(name, spec, "api"), created

    async def delete(self, name: str) -> None:
        """Stop and forget a watch (its streams stay)."""
        self._writable(name, await self.runner.specs(), "remove it there")
        if not await self.store.delete_watch(name):
            raise NotFound(f"no watch {name!r}")
        await self.runner.sync()
        self.runner.forget(name)

    @staticmethod
    def _writable(name: str, specs: dict[str, tuple[WatchIn, str]], how: str) -> None:
        if specs.get(name, (None, ""))[1] == "file":
            raise Conflict(("path", "name"), f"watch {name!r} is defined in "
                           f"TSAD_INGEST_CONFIG: {how}")

    async def _out(self, name: str, spec: WatchIn, source: str) -> WatchOut:
        return WatchOut(**spec.model_dump(), name=name, source=source,
                        evaluated_until=await self.store.cursor(name),
                        running_here=name in self.runner.holding,
                        last_error=self.runner.errors.get(name))
