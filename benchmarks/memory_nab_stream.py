"""Streaming run over NAB with no offline training: each file's memory comes from its own
first 15% (NAB's probationary period), then the rest streams through the online rule.

    python benchmarks/memory_nab_stream.py --data-dir ../shared/datasets

Per file, the series (T,) is one channel (T, 1). Every row's detector is fitted on the
first 15% (no labels used: the few files with labelled points there keep them in the
memory, as a stream would). The remaining 85% arrive in chunks of --chunk points
(``models.streaming.stream_scores``, the loop of ``service/scoring.py``): the chunk's
windows are scored in one batch with the current detector, one window every
--score-stride points, points in between repeating the last score (the service's
``costly_score_stride``); the service's SPOT threshold (``models.thresholds``) decides
which scored windows are normal, and online rows ``partial_fit`` those only. The metrics
use the continuous scores of the streamed 85% (TSB-AD: AUC-ROC, Standard-F1,
Affiliation-F1, VUS-ROC, VUS-PR; no point adjustment); thresholds only drive the update.

Rows, side by side:

* embedding memory (online): MiniLM embeddings of variance prompts, cosine distance to the
  nearest normal window in the memory; the memory grows from the windows judged normal.
* embedding memory (online, admission q=1.0): the same, but a window judged normal joins
  the memory only if it is no farther from it than the memory's own windows are from each
  other (``admit_quantile``: the max leave-one-out distance); chosen before any result.
* raw-window kNN (online): the same memory on raw scaled windows (the ablation: no LM),
  with and without the admission rule.
* embedding memory (frozen): the 15% memory, never updated (what the online rule buys).
* residual linear (online): ridge forecaster, refitted online on points judged normal,
  scored every --baseline-score-stride points (it is cheap; the service scores it at
  every point).
* Isolation Forest (frozen): fitted on the first 15%, no online update.

Memory rows: the fit takes one window every --stride points; online, the memory keeps one
window judged normal every --stride points as well (its partial_fit stride becomes
stride / score-stride, since only scored windows are offered). Their SPOT threshold is
primed with the memory's leave-one-out scores (past data only); the residual linear's
calibrates on its first scores, as in the service. The threshold's risk q defaults to
1e-2 rather than the service's alerting 1e-3: here it gates what the memory learns, where
a false alarm costs one missing entry and a miss teaches it an anomaly (chosen before
looking at any result; not tuned).

Files without labelled anomalies in the streamed part (artificialNoAnomaly and one
realAWSCloudwatch file) have undefined metrics: they are streamed (their alarm counts are
reported) but skipped in the metrics and left out of the averages.

The language model is the cost: the prompts of every window a file will score are encoded
up front in large batches into the embedding cache, which then serves the streaming loop
(an embedding depends only on its window, so scores are the same as encoding chunk by
chunk; the frozen row reuses the online row's embeddings). Metrics are computed in
--jobs worker processes while the next file streams. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the machine is shared; see --threads

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import numpy as np  # noqa: E402

from models.data import DataNotFound, NABSeries, load_nab, run_main  # noqa: E402
from models.detectors import Detector, build_detector  # noqa: E402
from models.detectors.base import aggregate_channels, sliding_windows  # noqa: E402
from models.evaluation import METRICS, evaluate_scores  # noqa: E402
from models.reporting import results_dir, save_report  # noqa: E402
from models.streaming import stream_scores  # noqa: E402
from models.thresholds import ThresholdSpec, build_threshold  # noqa: E402


@dataclass(frozen=True)
class Row:
    label: str
    detector: str
    online: bool
    memory: bool  # a nearest-normal-memory detector (stride, LOO calibration, min_memory)
    params: dict = field(default_factory=dict)


ROWS = (
    # admission off on the rows that measure the memory without it (the default is on)
    Row("embedding memory (online)", "embedding_memory", True, True,
        {"admit_quantile": None}),
    Row("embedding memory (online, admission q=1.0)", "embedding_memory", True, True,
        {"admit_quantile": 1.0}),
    Row("raw-window kNN (online, ablation: no LM)", "raw_knn", True, True,
        {"admit_quantile": None}),
    Row("raw-window kNN (online, admission q=1.0)", "raw_knn", True, True,
        {"admit_quantile": 1.0}),
    Row("embedding memory (frozen after 15%)", "embedding_memory", False, True),
    Row("residual linear (online)", "residual_linear", True, False),
    Row("Isolation Forest (frozen after 15%)", "isolation_forest", False, False),
)


def build(row: Row, args: argparse.Namespace) -> Detector:
    params = {"window": args.window} | row.params
    if row.memory:
        # min_memory guards the *online* cold start; here the memory is filled offline and
        # the shortest file's 15% holds only 8 windows at stride 16
        params |= {"stride": args.stride, "k": args.k, "memory_size": args.memory_size,
                   "min_memory": 1}
    return build_detector(row.detector, **params)


def threshold_spec(args: argparse.Namespace) -> ThresholdSpec:
    return ThresholdSpec(kind=args.threshold, q=args.q, calibration=args.threshold_calibration,
                         min_scores=args.threshold_min_scores)


def prefetch_embeddings(series: np.ndarray, start: int, args: argparse.Namespace) -> None:
    """Encode the prompts of every window the embedding rows will need (fit and scored
    windows) into the cache, in large batches."""
    from models.detectors.embedding_memory import EmbeddingMemory
    from models.lm.runtime import cached_encoder

    det = build(ROWS[0], args)
    assert isinstance(det, EmbeddingMemory)
    fit_windows = sliding_windows(series[:start], args.window, args.stride)
    ends = np.arange(start, len(series), args.score_stride)
    scored = sliding_windows(series, args.window)[ends - args.window + 1]
    encoder = cached_encoder(det.config.model_path, det.config.pooling)
    for part in (fit_windows, scored):
        for lo in range(0, len(part), 512):
            encoder.encode(det.prompts(part[lo:lo + 512]))


def run_row(row: Row, series: np.ndarray, start: int, args: argparse.Namespace) -> dict:
    det = build(row, args).fit(series[:start])
    score_stride = args.score_stride if row.memory else args.baseline_score_stride
    threshold = None
    if row.online:
        threshold = build_threshold(threshold_spec(args))
        if (normal := det.calibration_scores()) is not None:  # leave-one-out (memories)
            cal = aggregate_channels(normal, det.config.aggregate)
            threshold.process(cal, np.arange(len(cal), dtype=np.float64) - len(cal))
        if row.memory:  # one memory candidate per `stride` points, as in the fit
            det.config = replace(det.config, stride=max(1, args.stride // score_stride))
    entries_fit = det.memory_entries if row.memory else None
    run = stream_scores(det, series, start, threshold, chunk=args.chunk,
                        score_stride=score_stride, online=row.online)
    # the loop scores on the stride's grid of the stream index: the few points before the
    # first grid point have no score yet (the service answers warming_up), and score 0
    out = {"scores": np.nan_to_num(run.scores), "scored_windows": int(run.fresh.sum()),
           "alarms": int((run.anomalous & run.fresh).sum()) if row.online else None,
           "offered": run.offered if row.online else 0}
    if entries_fit is not None:
        out |= {"memory_fit": entries_fit, "memory_end": det.memory_entries}
    return out


def lm_stats() -> dict:
    from models.lm import runtime

    hits = misses = 0
    seconds = 0.0
    for enc in runtime._ENCODERS.values():
        hits += sum(enc.stats.hits.values())
        misses += enc.stats.misses
        seconds += enc.stats.encode_seconds
    return {"prompts_encoded": misses, "cache_hits": hits, "encode_seconds": round(seconds, 1)}


def fmt(m: dict | None, key: str) -> str:
    return "skipped" if m is None else f"{100 * m[key]:.2f}"


def markdown(report: dict) -> str:
    labels = [r["label"] for r in report["rows"]]
    a = report["args"]
    lines = [
        f"# NAB streaming, no offline training: {len(report['files'])} files, "
        f"{report['scored_files']} with anomalies",
        "",
        report["protocol"] + ".",
        "",
        f"`{report['command']}` (commit {report['commit']}, {report['date']}, "
        f"{report['machine']}, torch threads {a['threads']}). Total {report['seconds']} s; "
        f"language model: {report['lm']['prompts_encoded']} prompts encoded in "
        f"{report['lm']['encode_seconds']} s, {report['lm']['cache_hits']} cache hits.",
        "",
        f"## Average over the {report['scored_files']} files with anomalies (metrics in %)",
        "",
        "| method | AUC-ROC | Standard-F1 | Affiliation-F1 | VUS-ROC | VUS-PR | "
        "best VUS-PR (files) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        m = r["average"]
        lines.append(f"| {r['label']} | " + " | ".join(fmt(m, k) for k in METRICS)
                     + f" | {r['best_vus_pr_files']} | {r['seconds']} |")
    lines += ["", "Seconds: fit + streaming per row, summed over files; the language model's "
              "encoding (shared by both embedding rows) is counted once, above.", "",
              "## VUS-PR per file (%)", "",
              "| file | points | streamed | anomalous | " + " | ".join(labels) + " |",
              "|---|---|---|---|" + "---|" * len(labels)]
    for f in report["files"]:
        share = f"{100 * f['anomaly_share']:.1f}%"
        lines.append(f"| {f['file']} | {f['points']} | {f['streamed']} | {share} | "
                     + " | ".join(fmt(f["rows"][lab]["metrics"], "VUS-PR") for lab in labels)
                     + " |")
    for lab in labels:
        lines += ["", f"## {lab}", "",
                  "| file | points | anomalous | AUC-ROC | Standard-F1 | Affiliation-F1 | "
                  "VUS-ROC | VUS-PR | scored windows | alarms | memory (fit -> end) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in report["files"]:
            r = f["rows"][lab]
            mem = f"{r['memory_fit']} -> {r['memory_end']}" if "memory_fit" in r else ""
            alarms = "" if r["alarms"] is None else r["alarms"]
            lines.append(f"| {f['file']} | {f['points']} | {100 * f['anomaly_share']:.1f}% | "
                         + " | ".join(fmt(r["metrics"], k) for k in METRICS)
                         + f" | {r['scored_windows']} | {alarms} | {mem} |")
    notes = [f for f in report["files"] if f["labelled_in_fit"]]
    if notes:
        lines += ["", "Labelled points inside the first 15% (in the fitted memory; no label "
                  "is used): " + ", ".join(f"{f['file']} ({f['labelled_in_fit']})"
                                           for f in notes) + "."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets",
                    help="NAB folder or its parent (default ../shared/datasets)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--stride", type=int, default=16,
                    help="memory rows: one window every STRIDE points in the memory")
    ap.add_argument("--score-stride", type=int, default=16,
                    help="memory rows: a window scored every N points (the rest repeat it)")
    ap.add_argument("--baseline-score-stride", type=int, default=1,
                    help="residual linear and Isolation Forest: a window every N points")
    ap.add_argument("--chunk", type=int, default=64, help="points per streaming chunk")
    ap.add_argument("--k", type=int, default=1, help="memory: neighbours averaged")
    ap.add_argument("--memory-size", type=int, default=2048, help="memory entries per file")
    ap.add_argument("--fit-share", type=float, default=0.15,
                    help="leading share of each file the detectors are fitted on")
    ap.add_argument("--threshold", default="spot", choices=("spot", "dspot", "quantile"))
    ap.add_argument("--q", type=float, default=1e-2, help="SPOT risk (gates the update)")
    ap.add_argument("--threshold-calibration", type=int, default=100,
                    help="SPOT: scores (memory LOO scores first) before the tail fit")
    ap.add_argument("--threshold-min-scores", type=int, default=20,
                    help="SPOT: scores before anything is flagged")
    ap.add_argument("--rows", default="all",
                    help=f"comma-separated row numbers 1..{len(ROWS)} (default all)")
    ap.add_argument("--files", default="*", help="glob on the file name (e.g. 'realKnown*')")
    ap.add_argument("--limit", type=int, default=None, help="first N matching files only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    ap.add_argument("--jobs", type=int, default=1, help="metric worker processes")
    ap.add_argument("--out", type=Path,
                    default=None, help="output path without suffix: writes OUT.json and "
                    "OUT.md (default benchmarks/results/memory_nab_stream; runs/bench/... "
                    "for tests/data)")
    args = ap.parse_args()

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    rows = ROWS if args.rows == "all" else tuple(ROWS[int(i) - 1]
                                                  for i in args.rows.split(","))
    files: list[NABSeries] = [s for s in load_nab(args.data_dir)
                              if fnmatch.fnmatch(s.name, args.files)][:args.limit]
    if not files:
        raise DataNotFound(f"--data-dir {args.data_dir}: no NAB file matches --files "
                           f"{args.files!r}")
    args.out = args.out or results_dir(args.data_dir) / "memory_nab_stream"
    t_start = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=max(1, args.jobs),
                               mp_context=multiprocessing.get_context("spawn"))
    futures: dict[tuple[str, str], Future] = {}
    seconds = dict.fromkeys((r.label for r in rows), 0.0)
    per_file = []
    for s in tqdm(files, desc="NAB files", unit="file"):
        series = s.values[:, None]
        start = max(int(args.fit_share * len(series)), args.window - 1)
        labels = s.labels[start:].astype(int)
        if any(r.detector == "embedding_memory" for r in rows):
            prefetch_embeddings(series, start, args)
        entry = {"file": s.name, "points": len(series), "streamed": len(labels),
                 "anomaly_share": float(labels.mean()),
                 "labelled_in_fit": int(s.labels[:start].sum()), "rows": {}}
        for row in rows:
            t0 = time.perf_counter()
            out = run_row(row, series, start, args)
            seconds[row.label] += time.perf_counter() - t0
            if labels.any():
                futures[(s.name, row.label)] = pool.submit(evaluate_scores, out.pop("scores"),
                                                           labels)
            else:
                out.pop("scores")
            entry["rows"][row.label] = out | {"metrics": None}
        per_file.append(entry)
    for (name, label), fut in tqdm(futures.items(), desc="metrics", unit="row"):
        next(f for f in per_file if f["file"] == name)["rows"][label]["metrics"] = fut.result()
    pool.shutdown()

    scored = [f for f in per_file if f["rows"][rows[0].label]["metrics"] is not None]
    report_rows = []
    for row in rows:
        ms = [f["rows"][row.label]["metrics"] for f in scored]
        avg = {k: float(np.mean([m[k] for m in ms])) for k in METRICS} if ms else None
        best = sum(
            f["rows"][row.label]["metrics"]["VUS-PR"]
            >= max(f["rows"][r.label]["metrics"]["VUS-PR"] for r in rows) for f in scored)
        report_rows.append({"label": row.label, "detector": row.detector,
                            "online": row.online, "average": avg,
                            "best_vus_pr_files": int(best),
                            "seconds": round(seconds[row.label], 1)})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    report = {
        "dataset": "nab",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/memory_nab_stream.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores "
                   f"(load {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end)",
        "protocol": (
            f"each file is its own stream; detectors fitted on its first "
            f"{100 * args.fit_share:.0f}% (no labels), then the rest streamed in chunks of "
            f"{args.chunk} points; memory rows: window {args.window}, memory stride "
            f"{args.stride}, a window scored every {args.score_stride} points, k={args.k}, "
            f"MiniLM mean pooling, variance prompts; baselines scored every "
            f"{args.baseline_score_stride} point(s); online rows learn only windows the "
            f"service's {args.threshold.upper()} threshold (q={args.q:g}, calibration "
            f"{args.threshold_calibration} scores, memory rows primed with leave-one-out "
            f"scores) judged normal; between scored windows a point repeats the last score "
            f"(causal); metrics (TSB-AD, no point adjustment) on the streamed part only, "
            f"averaged over files with anomalies; files without are skipped"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scored_files": len(scored),
        "skipped_files": [f["file"] for f in per_file if f not in scored],
        "lm": lm_stats(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": report_rows,
        "files": per_file,
    }
    save_report(report, markdown(report), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
