"""What SPEAR's tokens can tell at all, without the LM: per MSL entity (column 0), every
test window (64 points, stride 8) is scaled as SPEAR scales it, ``window`` (centred on
the window's median, divided by its robust spread) or ``series`` (the training split's
mean and std), clipped to +-5 as the bins are; the window's "extremeness" is the largest
|scaled value| among its newest 8 points. AUC of extremeness for windows whose newest
point is a real anomaly against the rest, per entity and over all entities.

    python benchmarks/spear_inputs.py --data-dir ../shared/datasets \\
        --out benchmarks/results/spear_inputs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import load_msl, run_main  # noqa: E402
from models.detectors.base import sliding_windows  # noqa: E402
from models.detectors.spear import rank_auc  # noqa: E402

W, STRIDE, CLIP = 64, 8, 5.0


def window_scaled(x: np.ndarray) -> np.ndarray:
    med = np.median(x, axis=1, keepdims=True)
    mad = 1.4826 * np.median(np.abs(x - med), axis=1, keepdims=True)
    spread = np.maximum(mad, 0.1 * x.std(axis=1, keepdims=True))
    return (x - med) / np.where(spread > 0, spread, 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows, pooled = [], {"window": [], "series": [], "y": []}
    for e in load_msl(args.data_dir, "msl"):
        tr, te = e.train[:, 0].astype(np.float64), e.test[:, 0].astype(np.float64)
        wins = sliding_windows(te[:, None], W, STRIDE)[..., 0]
        y = e.labels[np.arange(len(wins)) * STRIDE + W - 1].astype(bool)
        sd = tr.std()
        z = {"window": window_scaled(wins), "series": (wins - tr.mean()) / (sd if sd > 0 else 1)}
        ext = {k: np.minimum(np.abs(v[:, -STRIDE:]), CLIP).max(1) for k, v in z.items()}
        row = {"entity": e.name, "anomalous_windows": int(y.sum()), "windows": int(len(y))}
        for k, v in ext.items():
            row[f"auc_{k}"] = rank_auc(v, y)
            row[f"clipped_{k}_anomaly"] = float((v[y] >= CLIP).mean()) if y.any() else None
            row[f"clipped_{k}_normal"] = float((v[~y] >= CLIP).mean())
            pooled[k].append(v)
        pooled["y"].append(y)
        rows.append(row)
    y = np.concatenate(pooled["y"])
    summary = {k: rank_auc(np.concatenate(pooled[k]), y) for k in ("window", "series")}
    lines = ["| entity | anomalous / windows | AUC window scaling | AUC series scaling | "
             "clipped (anomaly / normal), window | clipped (anomaly / normal), series |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        def f(v):
            return "-" if v is None or v != v else f"{v:.2f}"
        lines.append(f"| {r['entity']} | {r['anomalous_windows']} / {r['windows']} | "
                     f"{f(r['auc_window'])} | {f(r['auc_series'])} | "
                     f"{f(r['clipped_window_anomaly'])} / {f(r['clipped_window_normal'])} | "
                     f"{f(r['clipped_series_anomaly'])} / {f(r['clipped_series_normal'])} |")
    lines.append(f"| **all 27, pooled** | {int(y.sum())} / {len(y)} | "
                 f"**{summary['window']:.3f}** | **{summary['series']:.3f}** | | |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "pooled": summary},
                                                        indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
