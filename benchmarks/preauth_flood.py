"""/healthz latency while clients flood /score with 12 MB bodies and no key: what work
before authentication costs everyone else (the audit: two such clients took /healthz p50
from 5.7 ms to 1,280 ms; issue 24's bar: p50 under 20 ms with four).

The service runs as a real ``uvicorn service.main:app`` (keys required, in-memory store);
4 clients in their own process send 12 MB /score bodies (valid JSON) without a key, back
to back, while this process times GET /healthz, once idle and once under the flood (the
flood and the timing are tests/test_auth_gate.py's own). ``--baseline`` measures another
commit's tree in alternate rounds, side by side:

    git archive <commit> | tar -x -C /tmp/baseline
    python benchmarks/preauth_flood.py --baseline /tmp/baseline --baseline-label "<commit>"

Prints a markdown table and writes benchmarks/results/preauth_flood.{json,md}.
"""

from __future__ import annotations

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
from tests.test_auth_gate import ADMIN, healthz_under_flood  # noqa: E402


def milliseconds(latencies: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p90_ms": round(statistics.quantiles(latencies, n=10)[-1] * 1000, 1),
            "max_ms": round(max(latencies) * 1000, 1), "samples": len(latencies)}


def measure(root: Path | None, samples: int) -> dict:
    """One round on a fresh service from ``root`` (None: this tree)."""
    with ServiceProcess({"TSAD_AUTH": "keys", "TSAD_ADMIN_KEY": ADMIN}, root=root) as service:
        idle = []
        with httpx.Client(timeout=30) as http:
            for _ in range(samples):
                start = time.perf_counter()
                http.get(f"{service.url}/healthz").raise_for_status()
                idle.append(time.perf_counter() - start)
                time.sleep(0.02)
        flooded, answers = healthz_under_flood(service.url, samples)
    return {"idle": milliseconds(idle), "flood": milliseconds(flooded), "answers": answers}


def main() -> None:
    ap = reporting.service_benchmark_parser(__doc__, "preauth_flood")
    ap.add_argument("--samples", type=int, default=60, help="/healthz requests per phase")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds (alternating with the baseline): medians are reported")
    args = ap.parse_args()
    trees = reporting.trees_to_compare(args)
    rounds: dict[str, list[dict]] = {label: [] for label, _ in trees}
    for _ in range(args.rounds):
        for label, root in trees:
            rounds[label].append(measure(root, args.samples))
    rows = [{"tree": label, "phase": phase, **{
                key: statistics.median(r[phase][key] for r in rounds[label])
                for key in ("p50_ms", "p90_ms", "max_ms")}}
            for label, _ in trees for phase in ("idle", "flood")]
    lines = [f"# /healthz under a flood of 12 MB bodies without a key ({trees[-1][0]})", "",
             f"{datetime.now(UTC):%Y-%m-%d}, {platform.node()}, load average "
             f"{os.getloadavg()[0]:.1f} at the end (a shared machine); `python "
             f"benchmarks/preauth_flood.py --samples {args.samples} --rounds {args.rounds}"
             f"{reporting.baseline_options(args)}`; 4 flooding clients; medians of the "
             "rounds; the flood's answers (all rounds) in the JSON", "",
             "| tree | /healthz | p50 (ms) | p90 (ms) | max (ms) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['tree']} | {r['phase']} | {r['p50_ms']} | {r['p90_ms']} | "
                     f"{r['max_ms']} |")
    reporting.save_report({"commit": trees[-1][0], "rows": rows, "rounds": rounds},
                          "\n".join(lines), ROOT / "benchmarks" / "results" / args.name)


if __name__ == "__main__":
    main()
