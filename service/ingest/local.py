"""A real Prometheus server and a synthetic exporter as local processes, for the
real-component tests (tests/test_prometheus_e2e.py) and benchmarks/prometheus_ingest.py.

The server is the binary from the Debian package `prometheus`, unpacked into the venv by
`make prometheus` (no system service), or a `prometheus` on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

from service.process import free_port, terminate


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or shutil.which(
        "prometheus", path=str(Path(sys.executable).parent))


class PrometheusServer:
    """`prometheus` on 127.0.0.1:<port> with ``config`` (a dict, written as YAML), its
    remote-write receiver on, its TSDB in a temporary folder."""

    def __init__(self, config: dict, port: int | None = None,
                 log_path: Path | None = None) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("no prometheus binary: `make prometheus` unpacks it from the "
                               "Debian package `prometheus` into the venv")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tsad-prometheus-"))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = log_path or self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes it
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--web.enable-remote-write-receiver", "--web.enable-lifecycle",
             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("prometheus did not become ready")

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        params = {"query": promql} | ({"time": repr(at)} if at is not None else {})
        body = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict]:
        body = httpx.get(f"{self.url}/api/v1/query_range", timeout=10, params={
            "query": promql, "start": repr(start), "end": repr(end),
            "step": repr(step)}).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Exporter:
    """An HTTP server answering Prometheus scrapes with the text ``render()`` returns
    (called once per scrape), in a thread of this process."""

    def __init__(self, render: Callable[[], str]) -> None:
        self.render = render
        self.scrapes = 0
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                exporter.scrapes += 1
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Exporter:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
