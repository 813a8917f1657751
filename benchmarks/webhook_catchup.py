"""Webhook catch-up after a receiver outage: how soon after the receiver is back its queued
events arrive (the audit: first delivery a median 78 s, the last 127 s after a 2-minute
outage), and whether one alert's events arrive in order (the audit: an alert.resolved
before its alert.opened).

The service runs as a real ``uvicorn service.main:app`` (in-memory store, default
webhook settings: backoff from 2 s doubling, jittered); the receiver is an HTTP server in
this process that is shut down for the outage (connections refused) and started again
on the same port. Streams open and resolve alerts while it is down.

    python benchmarks/webhook_catchup.py --streams 20 --outage 120

``--baseline DIR`` runs another commit's tree first (``git archive <commit> | tar -x -C
DIR``), side by side. Prints a markdown table and writes
benchmarks/results/webhook_catchup.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import reporting  # noqa: E402
from service.process import ServiceProcess, free_port  # noqa: E402

ENV = {"TSAD_DEFAULT_DETECTOR": "residual_linear", "TSAD_DEFAULT_WINDOW": "16",
       "TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 64}}', "TSAD_THRESHOLD_MIN_SCORES": "50",
       "TSAD_THRESHOLD_CALIBRATION_POINTS": "200", "TSAD_ALERT_QUIET_POINTS": "10"}


class Receiver:
    """Records each event it accepts with its arrival time; ``down()`` closes the port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.arrived: list[tuple[float, dict]] = []
        self.server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.arrived.append((time.monotonic(), event))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                return None

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def incident(stream: str, seed: int) -> list[dict]:
    """Normal points, one spike (an alert opens), then quiet (it resolves)."""
    rng = np.random.default_rng(seed)
    v = 10 + rng.normal(0, 0.3, 400)
    v[330] += 12
    return [{"timestamp": 1.7e9 + 60.0 * i, "values": [float(x)]} for i, x in enumerate(v)]


def run(root: Path | None, streams: int, outage: float, wait: float) -> dict:
    receiver = Receiver(free_port())
    url = f"http://127.0.0.1:{receiver.port}/hook"
    with ServiceProcess(ENV, root=root) as service, httpx.Client(timeout=60) as http:
        r = http.post(f"{service.url}/webhooks", json={"url": url})  # loopback receiver
        r.raise_for_status()
        down_at = time.monotonic()  # down from the start: every event queues
        for k in tqdm(range(streams), desc="incidents", leave=False):
            http.post(f"{service.url}/score", json={"stream": f"s{k}", "points": incident(
                f"s{k}", k)}).raise_for_status()
        alerts = http.get(f"{service.url}/alerts", params={"limit": 500}).json()["alerts"]
        events = sum(a["version"] for a in alerts)
        time.sleep(max(0.0, outage - (time.monotonic() - down_at)))
        receiver.up()
        back = time.monotonic()
        deadline = back + wait
        while len({e["id"] for _, e in receiver.arrived}) < events and (
                time.monotonic() < deadline):
            time.sleep(0.1)
        receiver.down()
    times = sorted(t - back for t, _ in receiver.arrived)
    seen: dict[str, list[int]] = {}
    for _, e in sorted(receiver.arrived, key=lambda te: te[0]):
        seen.setdefault(e["alert"]["id"], []).append(e["alert"]["version"])
    disordered = sum(v != sorted(v) for v in seen.values())
    return {"streams": streams, "alerts": len(alerts), "events": events,
            "delivered": len({e["id"] for _, e in receiver.arrived}),
            "outage_seconds": outage,
            "first_after_back_seconds": round(times[0], 1) if times else None,
            "median_after_back_seconds": round(float(np.median(times)), 1) if times else None,
            "last_after_back_seconds": round(times[-1], 1) if times else None,
            "alerts_out_of_order": disordered}


def main() -> None:
    ap = reporting.service_benchmark_parser(__doc__, "webhook_catchup")
    ap.add_argument("--streams", type=int, default=20, help="one alert (opened, resolved) each")
    ap.add_argument("--outage", type=float, default=120.0, help="seconds the receiver is down")
    ap.add_argument("--wait", type=float, default=600.0,
                    help="at most this long for every event after the receiver is back")
    args = ap.parse_args()
    trees = reporting.trees_to_compare(args)
    commit = trees[-1][0]
    rows = [{"tree": label, **run(root, args.streams, args.outage, args.wait)}
            for label, root in trees]
    lines = [f"# Webhook catch-up after a {args.outage:g} s receiver outage ({commit})", "",
             f"{datetime.now(UTC):%Y-%m-%d}, {platform.node()}, load average "
             f"{os.getloadavg()[0]:.1f}; `python benchmarks/webhook_catchup.py --streams "
             f"{args.streams} --outage {args.outage:g}{reporting.baseline_options(args)}`; seconds "
             "after the receiver is back", "",
             "| tree | events | delivered | first (s) | median (s) | last (s) | alerts out of "
             "order |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['tree']} | {r['events']} | {r['delivered']} | "
                     f"{r['first_after_back_seconds']} | {r['median_after_back_seconds']} | "
                     f"{r['last_after_back_seconds']} | "
                     f"{r['alerts_out_of_order']} of {r['alerts']} |")
    reporting.save_report({"commit": commit, "rows": rows}, "\n".join(lines),
                ROOT / "benchmarks" / "results" / args.name)


if __name__ == "__main__":
    main()
