"""The Numenta Anomaly Benchmark through the live path, scored by NAB's rules.

Starts Redis and the real service (default settings, as ``make serve`` would) as their own
processes, replays every NAB file of a data directory through ``POST /score`` (files
concurrently, each in time order, batch by batch: no look-ahead), then scores with
``models/nab.py`` on all three profiles:

* the per-point ``likelihood`` (one corpus-wide threshold, optimised as NAB does),
* the per-point ``anomaly`` verdict,
* alerts as detections: a detection at each point where an alert opened (what operators
  actually receive).

``--spear STRIDE`` adds the soft-prompt classifier: SPEAR fitted on each file's
probationary period only (the rows NAB never scores; series scaling, log-odds score, as in
``configs/eval/msl_spear_scale.yaml``), then scored through the same loop every STRIDE-th
point (its newest STRIDE points' max), as an offline-loop row. Slow on a CPU: 35 fits.

``--lm STRIDE`` adds the language-model member: the embedding memory (MiniLM embeddings of
each window's prompt, nearest remembered normal window; online) scored every STRIDE-th
point through the same loop, alone, and beside the default as an ensemble member (its
distance divided by its own running record, the maximum taken with the default's record
ratio). Slow on a CPU: about 45k / STRIDE prompts.

Beside it, in the same run, offline rows through the same scoring loop
(``models.streaming``): every member of the default ensemble alone, the combinations, and
the previous default (residual linear), with their cost per point; and the published
detectors' scores on the same files from NAB's scoreboard, when the data directory is the
35-file part this project ships with (``--reference``).

    python benchmarks/nab.py --data-dir ../shared/datasets

Writes benchmarks/results/nab.{json,md}. Works on any NAB-layout directory (the full
corpus too).
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from throughput import start_redis  # noqa: E402

from models import nab  # noqa: E402
from models.data import run_main  # noqa: E402
from models.detectors import build_detector  # noqa: E402
from models.detectors.base import Records  # noqa: E402
from models.reporting import results_dir, save_report  # noqa: E402
from models.streaming import stream_scores  # noqa: E402
from service.process import ServiceProcess, free_port  # noqa: E402
from service.replay import fetch_alerts, post_score  # noqa: E402
from service.settings import Settings  # noqa: E402

PROFILES = list(nab.PROFILES)
SETTINGS = Settings()  # the service's defaults: what the live replay runs
# Published detectors on the 35 files of ../shared/datasets/nab, scored by NAB's own
# scorer (../shared/nab-reference/README.md): standard, low FP, low FN.
PUBLISHED = {
    "ARTime": (67.85, 57.84, 73.72), "Numenta HTM": (66.59, 60.81, 71.06),
    "CAD-OSE": (62.19, 57.14, 66.31), "Random Cut Forest": (49.53, 38.21, 56.05),
    "windowed Gaussian": (21.97, 4.87, 29.80),
    "tsad before the ensemble (residual linear + SPOT, live; ../shared/nab-reference)":
        (23.53, 15.49, 27.39),
}
# Offline rows: (label, detector, config). Same loop as the service, one file at a time.
OFFLINE = [
    ("ensemble default: range records at scales 1 and 16, shape grading", "ensemble", {}),
    ("ensemble: range records at scale 1 only", "ensemble", {"range_scales": [1]}),
    ("ensemble member alone: range", "ensemble", {"members": ["range"]}),
    ("ensemble member alone: shape", "ensemble",
     {"members": ["shape"], "record_members": ["shape"]}),
    ("ensemble member alone: forecast", "ensemble",
     {"members": ["forecast"], "record_members": ["forecast"]}),
    ("ensemble: range + shape records", "ensemble",
     {"members": ["range", "shape"], "record_members": ["range", "shape"]}),
    ("ensemble: range + forecast records", "ensemble",
     {"members": ["range", "forecast"], "record_members": ["range", "forecast"]}),
    ("ensemble: range + shape + forecast records", "ensemble",
     {"members": ["range", "shape", "forecast"],
      "record_members": ["range", "shape", "forecast"]}),
    ("residual linear (previous default), raw score", "residual_linear", {}),
]


def stream_id(key: str) -> str:
    return "nab." + re.sub(r"[^A-Za-z0-9_.:-]", "_", key.replace("/", ".").removesuffix(".csv"))


def replay_file(url: str, f: nab.NabFile, batch: int) -> dict:
    """Post one file in time order; per-point likelihood and verdict, alert rows."""
    stream = stream_id(f.key)
    lik = np.zeros(len(f.values))
    flag = np.zeros(len(f.values))
    with httpx.Client(base_url=url, timeout=120) as http:
        http.delete(f"/streams/{stream}")
        for lo in range(0, len(f.values), batch):
            points = [{"timestamp": float(t), "values": [float(v)]}
                      for t, v in zip(f.timestamps[lo:lo + batch], f.values[lo:lo + batch],
                                      strict=True)]
            resp = post_score(http, {"stream": stream, "points": points})
            if resp.status_code != 200:
                raise RuntimeError(f"{f.key}: POST /score {resp.status_code}: {resp.text}")
            for i, r in enumerate(resp.json()["results"]):
                lik[lo + i] = r.get("likelihood") or 0.0
                flag[lo + i] = float(r["anomaly"])
        alerts = fetch_alerts(http, stream, since=float(f.timestamps[0]) - 1.0)
    # an alert opens at the stamp of the point that opened it (the service may have moved
    # a repeated stamp forward by a millisecond: the nearest row at or before it)
    opened = np.zeros(len(f.values))
    for a in alerts:
        row = int(np.searchsorted(f.timestamps, a["opened_at"] + 1e-3, side="right")) - 1
        opened[max(row, 0)] = 1.0
    return {"likelihood": lik, "anomaly": flag, "alerts": opened}


def live(corpus: list[nab.NabFile], batch: int, concurrency: int) -> tuple[dict, float]:
    workdir = tempfile.mkdtemp(prefix="tsad-nab-")
    redis_port = free_port()
    redis = start_redis(redis_port, workdir)
    service = ServiceProcess(env={"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
                             log_path=Path(workdir) / "service.log")
    try:
        service.start(timeout=180)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            futures = {f.key: pool.submit(replay_file, service.url, f, batch) for f in corpus}
            out = {k: fut.result() for k, fut in tqdm(futures.items(), desc="replay",
                                                      unit="file")}
        return out, time.perf_counter() - t0
    finally:
        service.stop()
        redis.terminate()
        redis.wait()


def offline(corpus: list[nab.NabFile], detector: str, config: dict,
            stride: int = 1) -> tuple[dict, dict, float]:
    scores, lik = {}, {}
    t0 = time.perf_counter()
    for f in tqdm(corpus, desc=detector, unit="file", leave=False):
        # as the service builds it (its window, the detector's own defaults), with the
        # row's config
        det = build_detector(detector, window=SETTINGS.default_window, **config)
        run = stream_scores(det, f.values, 0, timestamps=f.timestamps, score_stride=stride)
        scores[f.key], lik[f.key] = np.nan_to_num(run.scores), np.nan_to_num(run.likelihood)
    return scores, lik, time.perf_counter() - t0


def record_ratio(scores: np.ndarray, history: int = 4096, warmup: int = 64) -> np.ndarray:
    """Each score divided by the largest of the previous ``history`` scores (0 before
    ``warmup`` scores): a member's surprise on the ensemble's scale (1 = its record)."""
    out = np.zeros(len(scores))
    for i in range(warmup, len(scores)):
        record = scores[max(0, i - history):i].max()
        out[i] = scores[i] / record if record > 0 else 0.0
    return out


def lm_rows(corpus: list[nab.NabFile], default: dict, stride: int,
            n_points: int) -> list[dict]:
    """The embedding memory alone and as a member of the default ensemble."""
    lm_scores, lm_lik, seconds = offline(corpus, "embedding_memory", {}, stride)
    member = {k: np.maximum(default[k], record_ratio(v)) for k, v in lm_scores.items()}
    return [table_row(label, "offline loop", arrays, corpus, n_points / seconds)
            for label, arrays in (
                (f"embedding memory alone (LM member, every {stride}th point), likelihood",
                 lm_lik),
                (f"ensemble + LM member (every {stride}th point), score", member))]


SPEAR = {"window": 32, "scaling": "series", "max_steps": 120, "train_stride": 4,
         "max_val_windows": 32, "eval_every": 10, "score": "log_odds"}


def spear_rows(corpus: list[nab.NabFile], stride: int, n_points: int) -> list[dict]:
    """SPEAR per file: fitted on the probationary period, then the service's loop (no
    online learning) from there on; earlier rows score 0 (NAB does not score them)."""
    scores, lik = {}, {}
    t0 = time.perf_counter()
    for f in tqdm(corpus, desc="spear", unit="file"):
        start = max(f.probation, 4 * SPEAR["window"])  # room for training and validation
        det = build_detector("spear", **SPEAR, score_last=stride).fit(f.values[:start, None])
        run = stream_scores(det, f.values, start, timestamps=f.timestamps,
                            score_stride=stride, online=False)
        scores[f.key], lik[f.key] = (np.r_[np.zeros(start), np.nan_to_num(a)]
                                     for a in (run.scores, run.likelihood))
    rate = n_points / (time.perf_counter() - t0)
    label = f"SPEAR fitted on each file's probationary period (every {stride}th point)"
    return [table_row(f"{label}, {what}", "offline loop", arrays, corpus, rate)
            for what, arrays in (("score", scores), ("likelihood", lik))]


def table_row(label: str, source: str, arrays: dict, corpus: list[nab.NabFile],
              points_per_s: float, fixed: bool = False) -> dict:
    """One row: all three profiles on the corpus, the standard profile on each half (own
    threshold), the cost. ``fixed``: binary detections, scored as fired."""
    halves_standard = []
    for half in halves(corpus):
        scored = {f.key: arrays[f.key] for f in half}
        r = (nab.score_detections(scored, half, "standard") if fixed
             else nab.score_corpus(scored, half, "standard"))
        halves_standard.append(r.score)
    return {"row": label, "source": source, "profiles": profile_scores(arrays, corpus, fixed),
            "halves": halves_standard, "points_per_s": points_per_s}


def profile_scores(scores: dict, corpus: list[nab.NabFile], fixed: bool = False) -> dict:
    out = {}
    for p in PROFILES:
        r = (nab.score_detections(scores, corpus, p) if fixed
             else nab.score_corpus(scores, corpus, p))
        out[p] = {"score": r.score, "threshold": r.threshold,
                  "files": {row.key: row.raw for row in r.files}}
    return out


def halves(corpus: list[nab.NabFile]) -> tuple[list, list]:
    keys = sorted(f.key for f in corpus)
    a = set(keys[0::2])
    return [f for f in corpus if f.key in a], [f for f in corpus if f.key not in a]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True,
                    help="a NAB-layout folder (or its parent holding nab/): category folders "
                    "of timestamp,value CSVs and combined_windows.json")
    ap.add_argument("--out", type=Path, default=None,
                    help="output path without suffix (default benchmarks/results/nab; "
                    "runs/bench/nab for tests/data)")
    ap.add_argument("--batch", type=int, default=500, help="points per POST /score")
    ap.add_argument("--concurrency", type=int, default=4, help="files replayed at once")
    ap.add_argument("--no-offline", action="store_true", help="only the live replay")
    ap.add_argument("--lm", type=int, metavar="STRIDE", default=0,
                    help="add the language-model member's rows, scoring every STRIDE-th "
                    "point (0 = no; slow on a CPU)")
    ap.add_argument("--spear", type=int, metavar="STRIDE", default=0,
                    help="add SPEAR's rows (fitted on each file's probationary period), "
                    "scoring every STRIDE-th point (0 = no; slow on a CPU)")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                    help="add the published detectors' rows (default: when the corpus is "
                    "the 35-file part they were scored on)")
    args = ap.parse_args()
    corpus = nab.load_corpus(args.data_dir)  # missing data: one line (run_main)
    args.out = args.out or results_dir(args.data_dir) / "nab"
    n_points = sum(len(f.values) for f in corpus)
    print(f"{len(corpus)} files, {n_points:,} points", file=sys.stderr)
    reference = args.reference if args.reference is not None else len(corpus) == 35

    results, elapsed = live(corpus, args.batch, args.concurrency)
    rows = []
    for name, label in (("likelihood", "per-point likelihood"),
                        ("anomaly", "per-point anomaly verdict"),
                        ("alerts", "alerts as detections")):
        rows.append(table_row(f"tsad live (default: ensemble), {label}", "live",
                              {k: v[name] for k, v in results.items()}, corpus,
                              n_points / elapsed, fixed=name != "likelihood"))
    default_scores = None
    if not args.no_offline:
        for label, detector, config in tqdm(OFFLINE, desc="offline rows", unit="row"):
            scores, lik, seconds = offline(corpus, detector, config)
            default_scores = default_scores or scores
            # a record-ratio detector's likelihood ranks points exactly as its score
            kinds = [("score", scores)] + [("likelihood", lik)] * (
                not isinstance(build_detector(detector), Records))
            rows += [table_row(f"{label}, {what}", "offline loop", arrays, corpus,
                               n_points / seconds) for what, arrays in kinds]
    if args.lm and default_scores is not None:
        rows += lm_rows(corpus, default_scores, args.lm, n_points)
    if args.spear:
        rows += spear_rows(corpus, args.spear, n_points)
    published = {k: dict(zip(PROFILES, v, strict=True)) for k, v in PUBLISHED.items()}
    result = {
        "data_dir": str(args.data_dir), "files": len(corpus), "points": n_points,
        "batch": args.batch, "concurrency": args.concurrency,
        "live_seconds": elapsed, "live_points_per_s": n_points / elapsed,
        "machine": platform.platform(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows, "published": published if reference else {},
    }
    save_report(result, table(result), args.out)
    return 0


def table(result: dict) -> str:
    lines = [
        f"# NAB through the live path ({result['files']} files, {result['points']:,} points)",
        "",
        f"`python benchmarks/nab.py --data-dir ...` ({result['date']}): the service (Redis "
        f"store, default settings) as its own process, every file replayed through POST "
        f"/score in time order at batch {result['batch']}, {result['concurrency']} files at "
        f"once: {result['live_points_per_s']:,.0f} points/s end to end. Scored by "
        "`models/nab.py` (reproduces NAB's official scorer). Per-point rows: one corpus-wide "
        "threshold optimised as NAB does; verdict and alert rows: as fired. Halves: the "
        "standard score on the even- and odd-numbered files (sorted by name), each with its "
        "own threshold, to show what carries over.",
        "",
        "| row | standard | low FP | low FN | halves (standard) | points/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        p = r["profiles"]
        lines.append(
            f"| {r['row']} ({r['source']}) | {p['standard']['score']:.2f} | "
            f"{p['reward_low_FP_rate']['score']:.2f} | {p['reward_low_FN_rate']['score']:.2f} "
            f"| {r['halves'][0]:.1f} / {r['halves'][1]:.1f} | {r['points_per_s']:,.0f} |")
    for name, p in result["published"].items():
        lines.append(f"| {name} (NAB's scorer, same files) | {p['standard']:.2f} | "
                     f"{p['reward_low_FP_rate']:.2f} | {p['reward_low_FN_rate']:.2f} | | |")
    live_rows = [r for r in result["rows"] if r["source"] == "live"]
    if live_rows:
        lines += ["", "Per file, live (NAB raw score, standard profile):", "",
                  "| file | likelihood | verdict | alerts |", "|---|---|---|---|"]
        files = live_rows[0]["profiles"]["standard"]["files"]
        for key in sorted(files):
            vals = " | ".join(f"{r['profiles']['standard']['files'][key]:.2f}"
                              for r in live_rows)
            lines.append(f"| {key} | {vals} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_main(main))
