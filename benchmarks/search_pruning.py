"""Does exact lower-bound pruning of the default detector's two nearest-window searches
pay on this machine? The service's offline loop with and without it, in one run.

The default (``ensemble``) searches its 2,048-point memory twice per 64-window block
(``models/detectors/window_search.py``): the shapes by cosine (memory member) and the raw
windows by squared distance (level member). Without pruning, each search is a float32
product with the whole memory then the exact formula on the windows within its error.
With it (the default), a 17- or 18-column product of DCT projections bounds every window
first, and the formula runs on the few survivors; where the bound is loose the pruned
search gives up and backs off. Both give the same scores to the last bit: this checks it
on every file (``np.array_equal`` of scores and likelihoods).

Per file: the CPU microseconds per point of ``models.streaming.stream_scores`` (the
service's loop, the threshold the service gives the stream, one BLAS thread as the
service runs), both ways taking turns for ``--rounds`` rounds (median shown), and the
share of searches the pruned path answered.

    python benchmarks/search_pruning.py --data-dir ../shared/datasets

Writes benchmarks/results/search_pruning.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import nab  # noqa: E402
from models.data import run_main  # noqa: E402
from models.detectors import build_detector, window_search  # noqa: E402
from models.detectors.ensemble import Ensemble  # noqa: E402
from models.reporting import results_dir, save_report  # noqa: E402
from models.streaming import stream_scores  # noqa: E402
from models.thresholds import build_threshold, verdict_spec  # noqa: E402
from service.scoring import stream_spec  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.stores.base import StreamMeta  # noqa: E402

FILES = ("realKnownCause/nyc_taxi.csv", "artificialWithAnomaly/art_daily_jumpsup.csv",
         "realAWSCloudwatch/ec2_cpu_utilization_5f5533.csv",
         "realKnownCause/machine_temperature_system_failure.csv",
         "realKnownCause/ambient_temperature_system_failure.csv",
         "realAWSCloudwatch/rds_cpu_utilization_cc0c53.csv")


def counting() -> Counter:
    """Count, for the rest of the process, the searches each path answered."""
    counts: Counter = Counter()
    for cls in (window_search.CosineMemory, window_search.SquaredMemory):
        nearest = cls.nearest

        def counted(self, *args, nearest=nearest):  # noqa: ANN001, ANN202 - a shim
            before = self.pruned
            out = nearest(self, *args)
            counts["pruned" if self.pruned > before else "full"] += 1
            return out
        cls.nearest = counted
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    p.add_argument("--files", nargs="+", default=list(FILES), help="NAB keys")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    settings = Settings()
    threadpool_limits(settings.blas_threads, user_api="blas")  # as the service does
    corpus = {f.key: f for f in nab.load_corpus(args.data_dir)}
    files = [key for key in args.files if key in corpus]
    if not files:
        print(f"search_pruning.py: none of --files in {args.data_dir}", file=sys.stderr)
        return 2
    counts = counting()
    prunes = Ensemble._prunes
    ways = {"full": lambda self, key, channel: False, "pruned": prunes}

    def run(key: str, way: str) -> tuple[float, object]:
        Ensemble._prunes = ways[way]
        try:
            f = corpus[key]
            det = build_detector(settings.default_detector, window=settings.default_window)
            meta = StreamMeta("s", 1, det.config.window, settings.default_detector)
            spec = verdict_spec(stream_spec(settings, meta), det, chosen=False)
            t = time.process_time()
            out = stream_scores(det, f.values, 0, build_threshold(spec),
                                timestamps=f.timestamps)
            return (time.process_time() - t) / len(f.values), out
        finally:
            Ensemble._prunes = prunes

    load_before = os.getloadavg()
    result: dict = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()} {os.cpu_count()} CPU cores",
                    "basis_size": window_search.BASIS_SIZE, "rounds": args.rounds,
                    "files": {}}
    lines = []
    for key in files:
        cpu: dict[str, list[float]] = {"full": [], "pruned": []}
        outs = {}
        for r in range(args.rounds):
            for way in (("full", "pruned") if r % 2 == 0 else ("pruned", "full")):
                counts.clear()
                seconds, outs[way] = run(key, way)
                cpu[way].append(seconds)
                if way == "pruned":
                    answered = counts["pruned"] / max(counts["pruned"] + counts["full"], 1)
        same = all(np.array_equal(getattr(outs["full"], k), getattr(outs["pruned"], k),
                                  equal_nan=True)
                   for k in ("scores", "likelihood", "anomalous"))
        full, pruned = (1e6 * float(np.median(cpu[w])) for w in ("full", "pruned"))
        result["files"][key] = {"full_us_per_point": full, "pruned_us_per_point": pruned,
                                "pruned_answered_share": answered, "identical": same,
                                "cpu_seconds_per_point": cpu}
        lines.append(f"| {key} | {full:.1f} | {pruned:.1f} | {full / pruned:.2f} | "
                     f"{answered:.2f} | {'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)
    load_after = os.getloadavg()
    result["load_average"] = {"before": load_before, "after": load_after}
    table = "\n".join([
        "# Exact lower-bound pruning of the default's two nearest-window searches",
        "",
        f"`python benchmarks/search_pruning.py --data-dir ../shared/datasets` "
        f"({result['when']}, {result['machine']}, one BLAS thread): the service's offline "
        f"loop over each NAB file, with the searches' pruned path (DCT-"
        f"{window_search.BASIS_SIZE} bound) and without it, taking turns for "
        f"{args.rounds} rounds; CPU microseconds per point, medians. Load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (2 cores shared with "
        f"other work: read the ratio).",
        "",
        "| file | full us/pt | pruned us/pt | full / pruned | searches the pruned path "
        "answered | scores, likelihoods, verdicts identical |",
        "|---|---|---|---|---|---|",
        *lines])
    save_report(result, table, args.out or results_dir(args.data_dir) / "search_pruning")
    return 0 if all(f["identical"] for f in result["files"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(run_main(main))
