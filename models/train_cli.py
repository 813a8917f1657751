"""`tsad train --config configs/train/<run>.yaml`: fit a registered detector on a dataset's
training split and write an artifact directory the service can serve by name.

    name: spear-nab-aws          # artifact directory name (models/pretrained/<name>)
    detector: spear
    params: {window: 50, max_steps: 200}
    data:
      dataset: nab               # nab | npy | a folder in the MSL layout (msl, smap, ...)
      include: realAWSCloudwatch/  # nab: files whose name starts with this
      train_share: 0.6           # nab: the first share of each file is training data
      columns: [0]               # msl/npy: input columns
      entities: 0                # msl: first N entities or "C-1,T-5" (0 = all)
      path: data/train.npy       # npy: a (T, C) array
    calibration: 0.2             # newest share of each training series held out
    quantile: 0.99               # threshold for detectors without their own calibrated cut

Every training series is split by time: the newest ``calibration`` share is held out, the
detector is fitted on the rest (several series: detectors with ``fit_series`` or ``fit_many`` take
them all, others their concatenation), held-out scores give ``calibration.json``. The
threshold is the detector's own calibrated cut when it has one (SPEAR: the probability
with the best F1 on its validation split), else the ``quantile`` of held-out scores.

The artifact: ``config.json`` + ``weights.safetensors`` (``load_detector``),
``calibration.json``, ``training_curve.json``, ``versions.json``, ``train.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

log = logging.getLogger("tsad.train")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fit a detector on a dataset; write an artifact",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="YAML training run")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"),
                   help="folder holding the dataset folders, msl/, nab/, ... (default "
                   "../shared/datasets; a clone has tests/data with small slices)")
    p.add_argument("--out", type=Path, default=None,
                   help="artifact directory (default models/pretrained/<name>)")
    p.set_defaults(func=run)


def load_training_series(data: dict, data_dir: Path) -> tuple[list[np.ndarray],
                                                             list[np.ndarray | None]]:
    """The training series (T_i, C) and their given point labels (or None)."""
    from models.data import load_msl, load_nab, select_entities

    kind = data.get("dataset", "msl")
    if kind == "nab":
        share = float(data.get("train_share", 0.6))
        picked = [s for s in load_nab(data_dir) if s.name.startswith(data.get("include", ""))]
        cuts = [int(share * len(s.values)) for s in picked]
        return ([s.values[:c, None] for s, c in zip(picked, cuts, strict=True)],
                [s.labels[:c].astype(bool) for s, c in zip(picked, cuts, strict=True)])
    if kind == "npy":
        x = np.load(data["path"]).astype(np.float64)
        x = x[:, None] if x.ndim == 1 else x
        return [x[:, data["columns"]] if data.get("columns") else x], [None]
    # any other name: a dataset folder in the MSL layout (msl, smap, ...)
    entities = select_entities(load_msl(data_dir, kind), data.get("entities"))
    cols = data.get("columns", [0])
    return [e.train[:, cols].astype(np.float64) for e in entities], [None] * len(entities)


def train_artifact(cfg: dict, data_dir: Path, out: Path) -> dict:
    """Fit, calibrate and save; returns the calibration summary."""
    from models.detectors import build_detector
    from models.detectors.base import LearnsFromLabels
    from models.evaluation import score_series

    det = build_detector(cfg["detector"], **cfg.get("params", {}))
    series, labels = load_training_series(cfg.get("data", {}), data_dir)
    share = float(cfg.get("calibration", 0.2))
    cuts = [int(len(x) * (1 - share)) for x in series]
    fit_part = [x[:c] for x, c in zip(series, cuts, strict=True)]
    held = [x[c:] for x, c in zip(series, cuts, strict=True)]
    t0 = time.perf_counter()
    if isinstance(det, LearnsFromLabels) and all(x.shape[1] == 1 for x in fit_part):
        det.fit_series([x[:, 0] for x in fit_part],
                       [None if lab is None else lab[:c]
                        for lab, c in zip(labels, cuts, strict=True)])
    else:  # one model over several series
        det.fit_many(fit_part)
    fit_seconds = time.perf_counter() - t0
    window = det.config.window
    # costly detectors (a language-model call per window) are calibrated on every window//4
    # points only, as the service scores them with a stride
    scores = np.concatenate([score_series(det, x, max(1, window // 4), "newest")
                             for x in held if len(x) >= window] or [np.zeros(1)])
    q = float(cfg.get("quantile", 0.99))
    own = det.calibrated_threshold
    calibration = {
        "threshold": float(own) if own is not None else float(np.quantile(scores, q)),
        "source": "detector's validation cut" if own is not None
        else f"{q} quantile of held-out training scores",
        "held_out_share": share, "held_out_scores": int(len(scores)),
        "quantiles": {str(k): float(np.quantile(scores, k)) for k in (0.5, 0.9, 0.99, 0.999)},
        "fit_seconds": round(fit_seconds, 1),
    }
    if det.constant_channels:  # scored 0: nothing in training to measure them against
        log.warning("channels %s are constant in the training data: scored 0",
                    det.constant_channels)
        calibration["constant_channels"] = det.constant_channels
    det.save(out)
    report = dict(det.training_report)
    (out / "calibration.json").write_text(json.dumps(calibration, indent=2))
    (out / "training_curve.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "versions.json").write_text(json.dumps(versions(), indent=2))
    return calibration


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(),
           "date": datetime.now(UTC).isoformat(timespec="seconds")}
    for pkg in ("numpy", "torch", "transformers", "safetensors", "scikit-learn", "scipy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def run(args: argparse.Namespace) -> int:
    import yaml

    text = args.config.read_text()
    cfg = yaml.safe_load(text)
    for key in ("name", "detector"):
        if not cfg.get(key):
            raise SystemExit(f"{args.config}: needs {key!r}")
    out = args.out or Path("models/pretrained") / cfg["name"]
    calibration = train_artifact(cfg, args.data_dir, out)
    (out / "train.yaml").write_text(text)
    print(json.dumps({"artifact": str(out), **calibration}, indent=2))
    return 0
