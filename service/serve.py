"""`tsad serve`: run the HTTP service with uvicorn."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the scoring service",
        description="Run the HTTP service. Every setting comes from the environment "
        "(prefix TSAD_, plus PORT and REDIS_URL); flags override host and port. Without "
        "REDIS_URL the embedded in-memory window store is used (single process). An "
        "address other than loopback needs TSAD_AUTH=keys (or TSAD_ALLOW_OPEN=true).")
    p.add_argument("--host", default=None, help="bind address (default TSAD_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default PORT or 8000)")
    p.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes (needs REDIS_URL when > 1); /metrics "
                   "merges them (Prometheus multiprocess files in a fresh directory under "
                   "PROMETHEUS_MULTIPROC_DIR, or the system temporary directory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.auth.guard import exposure_problem
    from service.connections import PROTOCOL
    from service.logs import configure_logging
    from service.settings import Settings

    settings = Settings()  # validated here, before anything binds a port
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    if args.workers > 1 and not settings.redis_url:
        raise SystemExit("--workers > 1 needs REDIS_URL: the in-memory store is per process")
    if problem := exposure_problem(settings):
        raise SystemExit(problem)
    # the app (service.main, in every worker) reads its settings again: same host and port
    os.environ["TSAD_HOST"], os.environ["TSAD_PORT"] = settings.host, str(settings.port)
    configure_logging(settings.log_level, settings.log_json)
    # Workers write their metrics to files that /metrics merges. A fresh directory per
    # start: files left by an earlier run would add its counts to this one's.
    metrics_dir = None
    if args.workers > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        base = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        if base:
            os.makedirs(base, exist_ok=True)
        metrics_dir = tempfile.mkdtemp(prefix="tsad-metrics-", dir=base)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by every worker
    # uvicorn shuts down gracefully on Ctrl-C or SIGTERM, then raises the signal again to
    # die by it, which `make serve` reports as "make: *** [serve] Terminated". A stop that
    # was asked for is a normal end: these handlers get the re-raised signal, exit 0.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _stopped)
    try:
        uvicorn.run("service.main:app", host=settings.host, port=settings.port,
                    workers=args.workers, log_config=None, access_log=False,
                    timeout_keep_alive=settings.keep_alive_seconds,
                    http=PROTOCOL)  # header deadline, size cap (service/connections.py)
    except _Stopped:
        pass
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


class _Stopped(Exception):
    """A stop signal (SIGINT, SIGTERM) arrived outside uvicorn's own handlers."""


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped
