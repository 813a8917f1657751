"""Run the service as a child process (integration tests, benchmarks, local topologies)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.connections import PROTOCOL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def terminate(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM a child that still runs, SIGKILL it after ``timeout`` s, and reap it."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServiceProcess:
    """`uvicorn service.main:app` on 127.0.0.1:<port>, configured by environment variables;
    with workers > 1, `tsad serve --workers N` (which merges the workers' metrics).
    ``root``: the source tree to run (default this one; a benchmark compares another
    commit's, exported with ``git archive``)."""

    def __init__(self, env: dict[str, str] | None = None, port: int | None = None,
                 workers: int = 1, log_path: str | Path | None = None,
                 root: str | Path | None = None) -> None:
        self.env = env or {}
        self.root = Path(root) if root else Path(__file__).resolve().parent.parent
        self.port = port or free_port()
        self.workers = workers
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        # the app's own host and port (its start-up checks and logs) are the real ones
        env = {**os.environ, "TSAD_LOG_LEVEL": "WARNING", "TSAD_HOST": "127.0.0.1",
               "TSAD_PORT": str(self.port), **self.env}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        cmd = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1",
               "--port", str(self.port), "--no-access-log",
               "--timeout-keep-alive", env.get("TSAD_KEEP_ALIVE_SECONDS", "5"),
               "--http", PROTOCOL]  # header deadline, size cap (service/connections.py)
        if self.workers > 1:
            cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", str(self.workers)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"service did not become healthy on port {self.port}")

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
