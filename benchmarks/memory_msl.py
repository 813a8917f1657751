"""Embedding memory on MSL beside its raw-window ablation, their fusion and the baselines,
one run, one table (DESIGN.md protocol, TSB-AD metrics, no point adjustment).

The language model is the cost, so prompt embeddings are computed once by `tsad embed`
(the script runs it when --embeddings holds none yet) and every memory row reuses them:

    python benchmarks/memory_msl.py --data-dir ../shared/datasets \\
        --embeddings runs/emb/msl-w64-s16 --out benchmarks/results/msl_memory

Every MSL channel (entity) is its own stream, column 0 (the telemetry value). Memories hold
the entity's training windows (window and stride of the embeddings); a test window's score
is the cosine distance to its nearest memory entry, spread over its points by max. Rows
marked "LOO-normalised" divide each entity's scores by the median/IQR of the leave-one-out
distances of its own training windows (training data only); "raw distance" rows do not
normalise. The fusion adds the two LOO z-scores with equal weights, fixed before looking
at any test label.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.data import load_msl  # noqa: E402
from models.detectors.base import sliding_windows  # noqa: E402
from models.detectors.embedding_memory import EmbeddingMemory  # noqa: E402
from models.detectors.raw_knn import RawKnn, scale_windows  # noqa: E402
from models.evaluate_cli import msl_anchors, write_report  # noqa: E402
from models.evaluation import (  # noqa: E402
    DetectorSpec,
    evaluate_scores,
    robust_center_scale,
    score_entity,
    spread_window_scores,
)
from models.lm.precompute import load_precomputed  # noqa: E402

BASELINES = [
    DetectorSpec("residual linear", "residual_linear", {"window": 64}, [0], 1, "newest"),
    DetectorSpec("PCA reconstruction", "pca", {"window": 64}, [0], 16, "max"),
    DetectorSpec("Isolation Forest", "isolation_forest", {"window": 64}, [0], 16, "max"),
]


def ensure_embeddings(path: Path, data_dir: Path, window: int, stride: int) -> None:
    if (path / "index.json").exists():
        return
    subprocess.run([sys.executable, "-m", "models.cli", "embed", "--dataset", "msl",
                    "--data-dir", str(data_dir), "--out", str(path), "--window", str(window),
                    "--stride", str(stride), "--pooling", "mean", "--strategy", "variance",
                    "--channels", "0"], check=True, cwd=ROOT)


def memory_rows(entities: list, emb: Path, k: int) -> dict[str, np.ndarray]:
    """Point scores per row, concatenated over entities."""
    train, index = load_precomputed(emb, "train")
    test, _ = load_precomputed(emb, "test")
    window, stride = index["window"], index["stride"]
    seg = {split: {s["stream"]: s for s in index["splits"][split]["segments"]}
           for split in ("train", "test")}
    rows: dict[str, list[np.ndarray]] = {}
    for e in entities:
        a, b = seg["train"][e.name], seg["test"][e.name]
        lm_train = np.asarray(train[a["row"]:a["row"] + a["count"], :1], dtype=np.float32)
        lm_test = np.asarray(test[b["row"]:b["row"] + b["count"], :1], dtype=np.float32)
        raw_train = scale_windows(sliding_windows(e.train[:, :1].astype(float), window, stride))
        raw_test = scale_windows(sliding_windows(e.test[:, :1].astype(float), window, stride))
        z = {}
        for name, det, tr, te in (
            ("embedding memory", EmbeddingMemory(window=window, stride=stride, k=k,
                                                 memory_size=len(lm_train)), lm_train, lm_test),
            ("raw-window kNN (ablation, no LM)", RawKnn(window=window, stride=stride, k=k,
                                                         memory_size=len(raw_train)),
             raw_train, raw_test),
        ):
            det.fit_features(tr)
            dist = det.score_features(te)[:, 0]
            center, scale = robust_center_scale(det.calibration_scores()[:, 0])
            z[name] = (dist - center) / scale
            for label, s in ((f"{name}, raw distance", dist),
                             (f"{name}, LOO-normalised", z[name])):
                rows.setdefault(label, []).append(
                    spread_window_scores(s, len(e.test), window, stride, "max"))
        fused = 0.5 * z["embedding memory"] + 0.5 * z["raw-window kNN (ablation, no LM)"]
        rows.setdefault("fusion: embedding memory + raw kNN (equal z weights)", []).append(
            spread_window_scores(fused, len(e.test), window, stride, "max"))
    return {label: np.concatenate(parts) for label, parts in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--embeddings", type=Path, default=ROOT / "runs" / "emb" / "msl-w64-s16",
                    help="tsad embed output (computed here when missing)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--k", type=int, default=1, help="neighbours averaged")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "msl_memory")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    ensure_embeddings(args.embeddings, args.data_dir, args.window, args.stride)
    entities = load_msl(args.data_dir)
    labels = np.concatenate([e.labels for e in entities]).astype(int)
    t0 = time.perf_counter()
    scored = memory_rows(entities, args.embeddings, args.k)
    seconds = {label: round(time.perf_counter() - t0, 1) for label in scored}
    for spec in BASELINES:
        t0 = time.perf_counter()
        scored[spec.label] = np.concatenate([
            score_entity(spec, e.train.astype(np.float64), e.test.astype(np.float64))
            for e in entities])
        seconds[spec.label] = round(time.perf_counter() - t0, 1)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {label: pool.submit(evaluate_scores, s, labels) for label, s in scored.items()}
        results = {label: f.result() for label, f in futures.items()}
    report = {
        "dataset": "msl", "entities": [e.name for e in entities], "points": int(len(labels)),
        "anomaly_share": float(labels.mean()),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "protocol": (f"each entity is its own stream, column 0; memories of training windows "
                     f"(window {args.window}, stride {args.stride}, k={args.k}; MiniLM mean "
                     f"pooling, variance prompts from `tsad embed`); baselines fit on the "
                     f"train split and normalised by held-out train scores; TSB-AD metrics; "
                     f"no point adjustment; no test labels used"),
        "rows": [{"label": label, "metrics": results[label], "seconds": seconds[label],
                  "columns": [0]} for label in scored],
        "anchors": msl_anchors(),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
