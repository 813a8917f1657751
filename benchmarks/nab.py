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

Beside it, in the same run, offline rows through the same scoring loop, threshold and
likelihood as the service (``models.streaming``): the default and its ablations (each part
taken out or set back to what it replaced), and the previous default (residual linear),
with their cost per point; and the published
detectors' scores on the same files from NAB's scoreboard, when the data directory is the
35-file part this project ships with (``--reference``). The language model's rows (as
the default's ranking member and as a confirmation tier) are ``benchmarks/lm_member.py``.
The live likelihood on NAB's normal points (outside every labelled window, after the
probationary period) is summarised too: its median and its share at 0.99 or above; and
how it ranks: its point-wise AUC over each file's labelled windows (nyc_taxi's and the
median over the files).

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
from models.reporting import results_dir, save_report  # noqa: E402
from models.streaming import stream_scores  # noqa: E402
from models.thresholds import build_threshold, verdict_spec  # noqa: E402
from service.process import ServiceProcess, free_port  # noqa: E402
from service.replay import fetch_alerts, post_score  # noqa: E402
from service.scoring import stream_spec  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.stores.base import StreamMeta  # noqa: E402

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
# Offline rows: (label, detector, config, loop options). Same loop, threshold and
# likelihood as the service, one file at a time. The default and its ablations: each
# part of the default taken out or set back to what it replaced.
OFFLINE = [
    ("ensemble default: robust range and level records, memory ranking", "ensemble", {}, {}),
    ("ensemble: range records only (no level member, no memory ranking)", "ensemble",
     {"members": ["range"]}, {}),
    ("ensemble: range records + memory ranking (no level member)", "ensemble",
     {"members": ["range", "memory"]}, {}),
    ("ensemble: no noise margin on range records", "ensemble",
     {"range_noise_margin": 0.0}, {}),
    ("ensemble: range set by the most extreme block (not robust)", "ensemble",
     {"range_rank": 1}, {}),
    ("ensemble: wild values join the range (no exclusion)", "ensemble",
     {"wild_spans": float("inf")}, {}),
    ("ensemble: level records at the record itself (no 10% margin)", "ensemble",
     {"distance_margin": 0.0}, {}),
    ("ensemble: memories learn every window (not only normal ones)", "ensemble",
     {"memory_learns": "all"}, {}),
    ("ensemble: memories of 1,024 points", "ensemble", {"memory_points": 1024}, {}),
    ("ensemble: memories of 4,096 points", "ensemble", {"memory_points": 4096}, {}),
    ("ensemble: a verdict right after another counts (no repeat factor)", "ensemble", {},
     {"repeat_factor": 1.0}),
    ("residual linear (the default before the ensemble)", "residual_linear", {}, {}),
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
            stride: int = 1, loop: dict | None = None) -> tuple[dict, dict, float]:
    """Per-file scores and likelihoods of the service's loop, offline: the detector as the
    service builds it (its window and warm-up) with the row's config, and the stream's
    threshold as the service builds it (a record detector's fixed cut, else the server's
    default), so the likelihood is the live one."""
    scores, lik = {}, {}
    t0 = time.perf_counter()
    for f in tqdm(corpus, desc=detector, unit="file", leave=False):
        # as the service builds it (its window, the detector's own defaults), with the
        # row's config, and the threshold it gives such a stream
        det = build_detector(detector, window=SETTINGS.default_window, **config)
        meta = StreamMeta(stream_id(f.key), 1, det.config.window, detector)
        spec = verdict_spec(stream_spec(SETTINGS, meta), det, chosen=False)
        run = stream_scores(det, f.values, 0, build_threshold(spec), timestamps=f.timestamps,
                            score_stride=stride, **(loop or {}))
        scores[f.key], lik[f.key] = np.nan_to_num(run.scores), np.nan_to_num(run.likelihood)
    return scores, lik, time.perf_counter() - t0


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
    if not args.no_offline:
        for label, detector, config, loop in tqdm(OFFLINE, desc="offline rows", unit="row"):
            scores, lik, seconds = offline(corpus, detector, config, loop=loop)
            rows += [table_row(f"{label}, {what}", "offline loop", arrays, corpus,
                               n_points / seconds)
                     for what, arrays in (("score", scores), ("likelihood", lik))]
    if args.spear:
        rows += spear_rows(corpus, args.spear, n_points)
    normal = normal_likelihood(corpus, {k: v["likelihood"] for k, v in results.items()})
    ranking = window_auc(corpus, {k: v["likelihood"] for k, v in results.items()})
    published = {k: dict(zip(PROFILES, v, strict=True)) for k, v in PUBLISHED.items()}
    result = {
        "data_dir": str(args.data_dir), "files": len(corpus), "points": n_points,
        "batch": args.batch, "concurrency": args.concurrency,
        "live_seconds": elapsed, "live_points_per_s": n_points / elapsed,
        "machine": platform.platform(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows, "published": published if reference else {},
        "normal_likelihood": normal, "window_auc": ranking,
    }
    save_report(result, table(result), args.out)
    return 0


def normal_likelihood(corpus: list[nab.NabFile], lik: dict[str, np.ndarray]) -> dict:
    """The live likelihood on NAB's normal points: outside every labelled window, after
    the probationary period, where the service reported one."""
    values = []
    for f in corpus:
        normal = np.ones(len(f.values), dtype=bool)
        normal[:f.probation] = False
        for a, b in f.windows:
            normal[a:b + 1] = False
        values.append(lik[f.key][normal & (lik[f.key] > 0)])
    v = np.concatenate(values)
    return {"points": int(len(v)), "median": float(np.median(v)),
            "share_at_099": float(np.mean(v >= 0.99))}


def window_auc(corpus: list[nab.NabFile], lik: dict[str, np.ndarray]) -> dict[str, float]:
    """Per file with labelled windows: the point-wise AUC of the live likelihood, the
    points inside the windows against the others (after the probationary period, where
    the service reported one): how well it ranks, whatever the threshold."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for f in corpus:
        labels = np.zeros(len(f.values), dtype=bool)
        for a, b in f.windows:
            labels[a:b + 1] = True
        scored = lik[f.key] > 0
        scored[:f.probation] = False
        if 0 < labels[scored].sum() < scored.sum():
            out[f.key] = float(roc_auc_score(labels[scored], lik[f.key][scored]))
    return out


def score_cells(row: dict) -> str:
    """A table row's standard, low FP and low FN scores and its halves, as table cells."""
    p = row["profiles"]
    return (f"{p['standard']['score']:.2f} | {p['reward_low_FP_rate']['score']:.2f} | "
            f"{p['reward_low_FN_rate']['score']:.2f} | {row['halves'][0]:.1f} / "
            f"{row['halves'][1]:.1f}")


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
        lines.append(f"| {r['row']} ({r['source']}) | {score_cells(r)} | "
                     f"{r['points_per_s']:,.0f} |")
    for name, p in result["published"].items():
        lines.append(f"| {name} (NAB's scorer, same files) | {p['standard']:.2f} | "
                     f"{p['reward_low_FP_rate']:.2f} | {p['reward_low_FN_rate']:.2f} | | |")
    if (n := result.get("normal_likelihood")) and n["points"]:
        lines += ["", f"Live likelihood on NAB's normal points ({n['points']:,} points outside "
                  f"every labelled window, after the probationary period): median "
                  f"{n['median']:.3f}, {100 * n['share_at_099']:.2f}% at 0.99 or above."]
    if auc := result.get("window_auc"):
        nyc = auc.get("realKnownCause/nyc_taxi.csv")
        lines += ["", f"Ranking: point-wise AUC of the live likelihood, the points of each "
                  f"file's labelled windows against its other points (after the probationary "
                  f"period): median {np.median(list(auc.values())):.3f} over the "
                  f"{len(auc)} files with windows"
                  + (f"; nyc_taxi {nyc:.3f}." if nyc is not None else ".")]
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
