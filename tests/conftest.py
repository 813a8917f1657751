"""Shared fixtures: a real redis-server (and a real 3-master Redis Cluster) per test
session on free loopback ports, and ``backend``: every storage backend in turn."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.process import free_port
from service.settings import Settings
from service.stores import build_backend
from service.stores.base import Backend, StreamPolicy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA_DIR = Path(__file__).parent / "data"


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Poll ``predicate`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


class RedisServer:
    """A throwaway redis-server process; stop() and start() let tests simulate outages."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # fail, never skip: CI must have Redis (make test installs it)
            raise RuntimeError("redis-server not found on PATH; run `make test` to install it")
        self.binary = binary
        self.port = port or free_port()
        self.password = password  # requirepass: clients must AUTH
        self.dir = tempfile.mkdtemp(prefix="tsad-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def flush(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "FLUSHALL"], check=True,
                       stdout=subprocess.DEVNULL,
                       env={**os.environ, **({"REDISCLI_AUTH": self.password}
                                             if self.password else {})})


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the session's Redis."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


class RedisClusterNodes:
    """Three cluster-enabled redis-servers joined by `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3) -> None:
        self.ports = [free_port() for _ in range(masters)]
        self.dir = tempfile.mkdtemp(prefix="tsad-cluster-")
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"  # any node: the client finds the rest

    def start(self) -> RedisClusterNodes:
        for port in self.ports:
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                 "--cluster-config-file", f"nodes-{port}.conf", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_for(lambda p=port: self.cli(p, "ping") == "PONG", timeout=10)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for port in self.ports:  # every node agrees the slots are covered
            wait_for(lambda p=port: "cluster_state:ok" in self.cli(p, "cluster", "info"),
                     timeout=30)
        return self

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                              text=True).stdout.strip()

    def node_of(self, key: str) -> int:
        """The port of the master that holds ``key``'s slot."""
        slot = int(self.cli(self.ports[0], "cluster", "keyslot", key))
        for line in self.cli(self.ports[0], "cluster", "nodes").splitlines():
            parts = line.split()
            for span in parts[8:]:
                lo, _, hi = span.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return int(parts[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no node holds slot {slot}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes().start()
    yield nodes
    nodes.stop()


# --- every backend: a test taking ``backend`` runs once on each --------------------------
BACKENDS = ("memory", "redis", "redis-cluster")


@dataclass
class BackendUnderTest:
    """One storage backend, as the service would configure it."""

    kind: str
    redis_url: str | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """Settings fields (``Settings(**backend.settings, ...)``) that select it."""
        if self.redis_url is None:
            return {}
        return {"redis_url": self.redis_url, "redis_cluster": self.kind == "redis-cluster"}

    @property
    def env(self) -> dict[str, str]:
        """The same as environment variables, for the service as a process."""
        return {f"TSAD_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in self.settings.items()}

    def build(self, policy: StreamPolicy | None = None, **settings: Any) -> Backend:
        """A backend with this stream policy (default: the store's own defaults)."""
        backend = build_backend(Settings(**self.settings, **settings))
        backend.streams.policy = policy or StreamPolicy()
        return backend


def _backend(kind: str, request: pytest.FixtureRequest) -> BackendUnderTest:
    if kind == "memory":
        return BackendUnderTest(kind)
    if kind == "redis":
        return BackendUnderTest(kind, request.getfixturevalue("redis_url"))
    cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
    for port in cluster.ports:  # a clean cluster per test
        cluster.cli(port, "flushall")
    return BackendUnderTest(kind, cluster.url)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> BackendUnderTest:
    """Each backend in turn: storage tests run on all of them."""
    return _backend(request.param, request)


@pytest.fixture(params=BACKENDS[:2])
def service_backend(request: pytest.FixtureRequest) -> BackendUnderTest:
    """The in-memory and the single-Redis backend, for tests of the whole service (the
    cluster runs the service in tests/test_cluster.py)."""
    return _backend(request.param, request)


SPEAR_TINY_WINDOW = 16


@pytest.fixture(scope="session")
def spear_tiny(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny SPEAR artifact (16-point windows, 4 prompts, 20 steps on a noisy sine with
    injected spikes) trained by `tsad train`'s code path: (artifacts dir, calibration).
    Trained once per test run: training through the real MiniLM is the slow part of the
    tests that serve it, so pytest-xdist workers share one copy (the first trains it under
    a file lock in the run's shared temp folder, the others read it)."""
    import json

    from filelock import FileLock

    from models.train_cli import train_artifact

    shared = tmp_path_factory.getbasetemp().parent / "spear-tiny"  # one per run
    with FileLock(f"{shared}.lock"):
        root, done = shared / "artifacts", shared / "calibration.json"
        if done.exists():
            return root, json.loads(done.read_text())
        t = np.arange(1500)
        data = shared / "data" / "train.npy"
        data.parent.mkdir(parents=True, exist_ok=True)
        np.save(data, np.sin(t / 4.0) + 0.05 * np.random.default_rng(0).normal(size=len(t)))
        cfg = {"name": "spear-tiny", "detector": "spear",
               "params": {"window": SPEAR_TINY_WINDOW, "n_prompts": 4, "max_steps": 20,
                          "labels": "inject", "inject_kinds": "spike"},
               "data": {"dataset": "npy", "path": str(data)}, "calibration": 0.2}
        calibration = train_artifact(cfg, data.parent, root / "spear-tiny")
        done.write_text(json.dumps(calibration))
    return root, calibration
