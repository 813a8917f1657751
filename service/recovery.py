"""Start-up recovery: score what a crash left stored but unscored, stream by stream, in the
background (requests are served meanwhile, and recover their own stream first)."""

from __future__ import annotations

import logging
import time

from service.errors import StoreUnavailable
from service.stores.base import Backend
from service.transaction import ScoreTransaction

log = logging.getLogger("tsad.pipeline")


async def recover_all(backend: Backend, transaction: ScoreTransaction) -> None:
    """``transaction.recover`` every stream the index lists, one at a time."""
    start, streams, points, after = time.monotonic(), 0, 0, None
    try:
        while metas := await backend.streams.list(limit=100, after=after):
            after = metas[-1].stream
            for m in metas:
                if m.points_scored is None or m.points_scored >= m.points_seen:
                    continue
                try:
                    points += await transaction.recover(m.stream)
                    streams += 1
                except StoreUnavailable as exc:  # a busy lock, or the store gone
                    log.warning("recovery of a stream failed",
                                extra={"stream": m.stream, "error": str(exc)})
                    await backend.ping()  # gone: stop here
                except Exception:  # one stream's failure must not stop the others
                    log.exception("recovery of a stream failed", extra={"stream": m.stream})
    except StoreUnavailable as exc:  # its streams recover on their next request
        log.warning("start-up recovery stopped: store unavailable", extra={"error": str(exc)})
    log.info("start-up recovery done", extra={
        "streams": streams, "points": points, "seconds": round(time.monotonic() - start, 3)})
