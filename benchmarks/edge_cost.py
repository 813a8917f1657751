"""What the cheapest requests cost the server: CPU time per request of the service process
for answers that do no work (GET /healthz, a POST /score refused 401 by the auth gate, a
404), measured from the process's own CPU counters (/proc/<pid>/stat), so that other load
on the machine changes the wall time but not the figure much.

The service runs as a real ``uvicorn service.main:app`` (keys required, in-memory store);
clients send the requests over kept-alive connections, a few at a time. ``--baseline``
measures another commit's tree in alternate rounds, side by side:

    git archive <commit> | tar -x -C /tmp/baseline
    python benchmarks/edge_cost.py --baseline /tmp/baseline --baseline-label "<commit>"

Prints a markdown table and writes benchmarks/results/edge_cost.{json,md}.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import reporting  # noqa: E402
from service.process import ServiceProcess  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
KINDS = {  # name: (method, path, body)
    "GET /healthz": ("GET", "/healthz", None),
    "POST /score, no key (401)": ("POST", "/score", {"stream": "s", "points": [
        {"timestamp": 1.7e9, "values": [1.0]}]}),
    "GET /nowhere (404)": ("GET", "/nowhere", None),
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def load(url: str, method: str, path: str, body: dict | None, n: int,
               clients: int) -> float:
    """Send ``n`` requests over ``clients`` kept-alive connections; their wall seconds."""
    start = time.perf_counter()

    async def client(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for _ in range(k):
                await http.request(method, path, json=body)

    await asyncio.gather(*(client(n // clients) for _ in range(clients)))
    return time.perf_counter() - start


def measure(root: Path | None, n: int, clients: int) -> dict[str, dict]:
    """One round on a fresh service from ``root`` (None: this tree): per kind of request,
    the server's CPU per request and the clients' rate."""
    env = {"TSAD_AUTH": "keys", "TSAD_ADMIN_KEY": "edge-cost-admin-key-" + "k" * 32}
    out = {}
    with ServiceProcess(env, root=root) as service:
        pid = service.proc.pid
        for name, (method, path, body) in KINDS.items():
            asyncio.run(load(service.url, method, path, body, 200, clients))  # warm up
            cpu = cpu_seconds(pid)
            wall = asyncio.run(load(service.url, method, path, body, n, clients))
            out[name] = {"cpu_us": (cpu_seconds(pid) - cpu) / n * 1e6, "rate": n / wall}
    return out


def main() -> None:
    ap = reporting.service_benchmark_parser(__doc__, "edge_cost")
    ap.add_argument("--requests", type=int, default=3000, help="per kind of request")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds (alternating with the baseline): medians are reported")
    args = ap.parse_args()
    trees = reporting.trees_to_compare(args)
    commit = trees[-1][0]
    rounds: dict[str, list[dict]] = {label: [] for label, _ in trees}
    for _ in range(args.rounds):
        for label, root in trees:
            rounds[label].append(measure(root, args.requests, args.clients))
    rows = [{"tree": label, "kind": kind, "requests": args.requests, "rounds": args.rounds,
             "server_cpu_us_per_request": round(statistics.median(
                 r[kind]["cpu_us"] for r in rounds[label])),
             "requests_per_second": round(statistics.median(
                 r[kind]["rate"] for r in rounds[label]))}
            for kind in KINDS for label, _ in trees]
    lines = [f"# The cheapest requests: server CPU per request ({commit})", "",
             f"{datetime.now(UTC):%Y-%m-%d}, {platform.node()}, load average "
             f"{os.getloadavg()[0]:.1f} at the end (a shared machine: the rate follows "
             "the load, the CPU per request much less); `python benchmarks/edge_cost.py "
             f"--requests {args.requests} --clients {args.clients} --rounds {args.rounds}"
             f"{reporting.baseline_options(args)}`, medians of the rounds", "",
             "| request | tree | server CPU per request (µs) | requests/s |",
             "| --- | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['tree']} | {r['server_cpu_us_per_request']:,} | "
                     f"{r['requests_per_second']:,} |")
    reporting.save_report({"commit": commit, "rows": rows, "rounds": rounds}, "\n".join(lines),
                ROOT / "benchmarks" / "results" / args.name)


if __name__ == "__main__":
    main()
