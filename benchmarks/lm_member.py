"""The language model where it could help the default detector: as its ranking member
(in place of the raw-window memory) and as a confirmation tier, on NAB (both halves) and
MSL column 0, beside the default in the same run.

* **LM ranking member**: below the record line the default ranks points by its raw-window
  memory's grade, ``q / (1 + q)`` with ``q`` the window's nearest-neighbour distance in
  multiples of the stream's typical one. Here the embedding memory's distance (MiniLM
  embeddings of each window's prompt, its own online memory, every ``--stride``-th point)
  takes that place, graded the same way (the typical distance: the median of the
  stream's earlier ones). Records stay as the default raises them.
* **confirmation tier**: a sensitive first tier (the default without its noise margin and
  level margin) proposes records; a record stands only where a confirmer's grade is at
  least ``c``, else the point falls back to its grade. The confirmer is the embedding
  memory, or (the control without a language model) the raw-window memory. ``c`` is
  chosen on NAB's even-numbered files (half A) among 0.3 to 0.8 and checked on
  the odd ones; the same ``c`` then runs on MSL.

Rows combine per-point scores of the service's own loop (``benchmarks/nab.py``'s offline
path) after the fact. MSL: each entity fitted on its training split and frozen (the
``msl_default`` protocol; the default's scores are stream-relative and are not normalised
again); the embedding memory reads ``tsad embed`` output (window 64, stride 16, column 0).

    python benchmarks/lm_member.py --data-dir ../shared/datasets \\
        --embeddings runs/emb/msl-w64-s16

Writes benchmarks/results/lm_member.{json,md}; the NAB embedding-memory scores are
cached under runs/lm_member/ (the LM is the slow part: about 11k prompts at stride 16).
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import nab as nab_bench  # noqa: E402

from models import evaluation as ev  # noqa: E402
from models import nab  # noqa: E402
from models.data import load_msl, run_main  # noqa: E402
from models.detectors import build_detector  # noqa: E402
from models.reporting import save_report  # noqa: E402

SENSITIVE = {"range_noise_margin": 0.0, "distance_margin": 0.0}
CONFIRM_CUTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def grade(distance: np.ndarray, typical: np.ndarray | float) -> np.ndarray:
    """The default's grade of a distance: q / (1 + q), q in multiples of the typical."""
    q = distance / np.maximum(typical, 1e-3)
    return np.minimum(q / (1.0 + q), 1.0 - 1e-9)


def causal_grade(distance: np.ndarray, fresh: np.ndarray, history: int = 256) -> np.ndarray:
    """Grade each point's distance against the median of the stream's earlier fresh
    distances (the last ``history`` of them)."""
    out = np.zeros(len(distance))
    seen: list[float] = []
    for i, (d, f) in enumerate(zip(distance, fresh, strict=True)):
        if seen:
            out[i] = grade(d, float(np.median(seen[-history:])))
        if f:
            seen.append(float(d))
    return out


def combine(records: np.ndarray, ranking: np.ndarray) -> np.ndarray:
    """Records (>= 1) as they are, the ranking below them."""
    return np.where(records >= 1.0, records, ranking)


def confirmed(first: np.ndarray, confirmer: np.ndarray, ranking: np.ndarray,
              cut: float) -> np.ndarray:
    """First-tier records that the confirmer's grade backs (>= cut); the rest ranked."""
    return np.where((first >= 1.0) & (confirmer >= cut), first, ranking)


# --- NAB ---------------------------------------------------------------------------------
def nab_scores(corpus: list[nab.NabFile], stride: int, cache: Path) -> dict[str, dict]:
    """Per file: the default's scores, the sensitive tier's, the raw-window memory's
    grade and the embedding memory's graded distance."""
    out: dict[str, dict] = {k: {} for k in (f.key for f in corpus)}
    for name, config in (("default", {}), ("sensitive", SENSITIVE),
                         ("raw_grade", {"members": ["memory"]})):
        scores, _, _ = nab_bench.offline(corpus, "ensemble", config)
        for key, s in scores.items():
            out[key][name] = s
    path = cache / f"nab_embedding_memory_s{stride}.npz"
    if path.is_file():
        lm = dict(np.load(path))
    else:
        lm_scores, _, _ = nab_bench.offline(corpus, "embedding_memory", {}, stride)
        lm = {k.replace("/", "__"): v for k, v in lm_scores.items()}
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, **lm)
    for f in corpus:
        d = lm[f.key.replace("/", "__")]
        fresh = (np.arange(len(d)) % stride == 0) & (d > 0)
        out[f.key]["lm_grade"] = causal_grade(d, fresh)
    return out


def nab_row(label: str, arrays: dict[str, np.ndarray], corpus: list[nab.NabFile]) -> dict:
    row = nab_bench.table_row(label, "offline loop, combined", arrays, corpus, 0.0)
    nyc = [f for f in corpus if f.key.endswith("nyc_taxi.csv")]
    if nyc:
        from sklearn.metrics import roc_auc_score

        f = nyc[0]
        labels = np.zeros(len(f.values), bool)
        for a, b in f.windows:
            labels[a:b + 1] = True
        scored = arrays[f.key] > 0
        row["nyc_taxi_auc"] = float(roc_auc_score(labels[scored], arrays[f.key][scored]))
    return row


def cut_scores(per: dict[str, dict], first: str, confirmer: str,
               half: list[nab.NabFile]) -> dict[float, float]:
    """Half A's standard score of the confirmation tier at every candidate cut."""
    out = {}
    for cut in CONFIRM_CUTS:
        arrays = {f.key: confirmed(per[f.key][first], per[f.key][confirmer],
                                   below_records(per[f.key]["default"]), cut)
                  for f in half}
        out[cut] = nab.score_corpus(arrays, half, "standard").score
    return out


def below_records(scores: np.ndarray) -> np.ndarray:
    """The default's ranking: its scores below the record line (records read 0)."""
    return np.where(scores >= 1.0, 0.0, scores)


def nab_rows(corpus: list[nab.NabFile], per: dict[str, dict]) -> tuple[list[dict], dict]:
    half_a, _ = nab_bench.halves(corpus)
    below = {k: below_records(v["default"]) for k, v in per.items()}
    rows = [nab_row("default (raw-window memory ranks below the records)",
                    {k: v["default"] for k, v in per.items()}, corpus),
            nab_row("LM ranking member: the embedding memory ranks below the records",
                    {k: combine(v["default"], v["lm_grade"]) for k, v in per.items()},
                    corpus)]
    cuts = {}
    for confirmer, what in (("lm_grade", "embedding memory (LM)"),
                            ("raw_grade", "raw-window memory (no LM)")):
        tried = cut_scores(per, "sensitive", confirmer, half_a)
        cut = cuts[confirmer] = max(tried, key=tried.get)
        cuts[f"{confirmer} tried on half A"] = tried
        rows.append(nab_row(
            f"confirmation tier: sensitive records confirmed by the {what}, grade >= {cut}",
            {k: confirmed(v["sensitive"], v[confirmer], below[k], cut)
             for k, v in per.items()}, corpus))
    rows.append(nab_row("sensitive first tier alone (no confirmation)",
                        {k: v["sensitive"] for k, v in per.items()}, corpus))
    return rows, cuts


# --- MSL ---------------------------------------------------------------------------------
def msl_rows(data_dir: Path, embeddings: Path, cuts: dict[str, float]) -> list[dict]:
    from models.lm.precompute import load_precomputed

    train_emb, index = load_precomputed(embeddings, "train")
    test_emb, _ = load_precomputed(embeddings, "test")
    window, stride = index["window"], index["stride"]
    segs = {split: {s["stream"]: s for s in index["splits"][split]["segments"]}
            for split in ("train", "test")}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "default", "sensitive", "lm_grade", "raw_grade", "labels")}
    for e in load_msl(data_dir):
        train, test = ev.select(e.train, [0]), ev.select(e.test, [0])
        for name, config in (("default", {}), ("sensitive", SENSITIVE),
                             ("raw_grade", {"members": ["memory"]})):
            det = build_detector("ensemble", window=window, **config).fit(train)
            cols[name].append(ev.score_series(det, test, 1, "newest"))
        rows = {}
        for split, arr in (("train", train_emb), ("test", test_emb)):
            seg = segs[split][e.name]
            rows[split] = np.asarray(arr[seg["row"]:seg["row"] + seg["count"]],
                                     dtype=np.float32)
        mem = build_detector("embedding_memory", window=window, stride=stride,
                             memory_size=max(len(rows["train"]), 1))
        mem.fit_features(rows["train"])
        d = ev.spread_window_scores(mem.score_features(rows["test"])[:, 0], len(test), window,
                                 stride, "newest")
        cols["lm_grade"].append(grade(d, float(np.median(mem.calibration_scores()))))
        cols["labels"].append(e.labels)
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    below = below_records(cat["default"])
    out = []
    for label, scores in (
            ("default (raw-window memory ranks below the records)", cat["default"]),
            ("LM ranking member: the embedding memory ranks below the records",
             combine(cat["default"], cat["lm_grade"])),
            (f"confirmation tier: embedding memory (LM), grade >= {cuts['lm_grade']}",
             confirmed(cat["sensitive"], cat["lm_grade"], below, cuts["lm_grade"])),
            (f"confirmation tier: raw-window memory (no LM), grade >= {cuts['raw_grade']}",
             confirmed(cat["sensitive"], cat["raw_grade"], below, cuts["raw_grade"])),
            ("sensitive first tier alone (no confirmation)", cat["sensitive"])):
        out.append({"row": label, "metrics": ev.evaluate_scores(scores, cat["labels"])})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True,
                    help="folder holding nab/ and msl/")
    ap.add_argument("--embeddings", type=Path, required=True,
                    help="`tsad embed --dataset msl --window 64 --stride 16 --pooling mean` "
                    "output (column 0)")
    ap.add_argument("--stride", type=int, default=16,
                    help="NAB: the embedding memory scores every STRIDE-th point")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lm_member")
    args = ap.parse_args()
    corpus = nab.load_corpus(args.data_dir / "nab")
    per = nab_scores(corpus, args.stride, ROOT / "runs/lm_member")
    rows, cuts = nab_rows(corpus, per)
    result = {"nab": rows, "cuts": cuts, "stride": args.stride,
              "msl": msl_rows(args.data_dir, args.embeddings, cuts),
              "machine": platform.platform(),
              "date": datetime.now(UTC).isoformat(timespec="seconds")}
    save_report(result, table(result), args.out)
    return 0


def table(result: dict) -> str:
    lines = [
        "# The language model as the default's ranking member and as a confirmation tier",
        "",
        f"`python benchmarks/lm_member.py` ({result['date']}). NAB (35 files): per-point "
        "scores of the service's loop, combined after the fact; the embedding memory "
        f"scores every {result['stride']}th point. Confirmation cuts chosen on half A "
        "(even-numbered files) by the standard profile, checked on half B.",
        "",
        "| NAB row | standard | low FP | low FN | halves (standard) | nyc_taxi AUC |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["nab"]:
        lines.append(f"| {r['row']} | {nab_bench.score_cells(r)} | "
                     f"{r.get('nyc_taxi_auc', float('nan')):.3f} |")
    for confirmer, what in (("lm_grade", "embedding memory"), ("raw_grade", "raw-window memory")):
        tried = result["cuts"][f"{confirmer} tried on half A"]
        lines.append(f"\nConfirmation by the {what}, half A (standard) by cut: " + ", ".join(
            f"{c}: {v:.1f}" for c, v in tried.items()) + ".")
    lines += ["", "MSL column 0, 27 entities, fitted on train, frozen (msl_default protocol):",
              "", "| MSL row | " + " | ".join(ev.METRICS) + " |",
              "|---|" + "---|" * len(ev.METRICS)]
    for r in result["msl"]:
        lines.append(f"| {r['row']} | " + " | ".join(
            f"{100 * r['metrics'][m]:.2f}" for m in ev.METRICS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_main(main))
