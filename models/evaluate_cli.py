"""`tsad evaluate`: score a dataset's test split with several detectors in one run and write
one table (JSON + markdown); on MSL, beside the CMA-TSAD paper's rows (its Table 1).

The dataset is a folder in the MSL layout (models/data.py: entities.csv, train.npy,
test.npy, test_label.npy), named by --dataset (msl, smap, ...) under --data-dir. A clone
has no ../shared/datasets: ``--data-dir tests/data`` has a two-entity MSL slice.

Rows come from a YAML config (``configs/eval/*.yaml``)::

    dataset: msl
    rows:
      - label: embedding memory (ours)
        detector: embedding_memory
        params: {window: 64, stride: 16}
        columns: [0]
        stride: 16
        spread: max

A row may read its features from ``tsad embed`` output instead of running the language
model (``embeddings: runs/emb/msl-w64-s16``; memory detectors), and a row may fuse earlier
rows (``fuse: [label a, label b]``, ``method: z | rank``, ``weights: train | equal``):
per entity, each member's normalised scores are calibrated on its training-data scores
and added with weights learnt from them (``models.fusion``). A row may also score an
earlier row's fitted models again with scoring-only settings changed (``rescore: label``,
``params: {score: probability}``): two scorings of one fit side by side.

or from ``--artifact DIR`` (a trained detector; scored as-is, no refit).
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

log = logging.getLogger("tsad.evaluate")

# CMA-TSAD paper, Table 1 (MSL), in %: the numbers to beat.
MSL_ANCHORS = {
    "TimesNet": (57.18, 21.24, 67.64, 64.63, 20.67),
    "D3R": (63.00, 23.98, 69.79, 69.02, 20.93),
    "M2N2": (59.15, 21.76, 67.88, 65.40, 21.55),
    "PatchAD": (60.94, 24.92, 70.10, 66.43, 19.65),
    "CMA-TSAD (variance prompt)": (59.09, 21.82, 67.93, 64.12, 17.41),
}


PROTOCOL = (
    "each entity is its own stream: fit on its train split, test scores normalised by scores "
    "of held-out train data (memory rows: by the leave-one-out distances of their training "
    "windows); fusion rows add their members' normalised scores per entity, calibrated and "
    "weighted on training scores only; concatenated; TSB-AD metrics; no point adjustment; "
    "no test labels used")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate detectors on a dataset (TSB-AD metrics)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML with the rows to evaluate")
    p.add_argument("--artifact", type=Path, action="append", default=[],
                   help="a trained artifact directory to add as a row (repeatable)")
    p.add_argument("--dataset", default=None,
                   help="a dataset folder in the MSL layout under --data-dir: msl, smap, ... "
                   "(default: the config's dataset)")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"),
                   help="folder holding the dataset folder (default ../shared/datasets)")
    p.add_argument("--entities", default="",
                   help="the first N entities, or comma-separated names (e.g. C-1,T-5); "
                   "default all")
    p.add_argument("--out", type=Path, required=True,
                   help="output path without suffix: writes OUT.json and OUT.md")
    p.add_argument("--jobs", type=int, default=2, help="processes computing metrics")
    p.set_defaults(func=run)


def load_rows(args: argparse.Namespace) -> tuple[str, list]:
    import yaml

    from models.evaluation import DetectorSpec

    dataset, rows = args.dataset, []
    if args.config:
        cfg = yaml.safe_load(args.config.read_text())
        dataset = dataset or cfg.get("dataset")
        rows = [DetectorSpec(**row) for row in cfg.get("rows", [])]
    if not rows and not args.artifact:
        raise SystemExit("nothing to evaluate: give --config and/or --artifact")
    return dataset or "msl", rows


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.data import load_msl, select_entities
    from models.detectors import load_detector
    from models.evaluation import (
        check_embeddings,
        fuse_entity,
        score_entity_full,
        score_series,
        select,
    )

    dataset, specs = load_rows(args)
    if dataset == "nab":
        raise SystemExit("--dataset: evaluate reads datasets in the MSL layout (entities); "
                         "NAB is scored by benchmarks/alerts_nab.py")
    for spec in specs:  # before minutes of scoring, not after
        check_embeddings(spec, dataset, args.data_dir)
    entities = select_entities(load_msl(args.data_dir, dataset), args.entities)
    labels = np.concatenate([e.labels for e in entities]).astype(int)
    scored: dict[str, dict] = {}
    per_entity: dict[str, list] = {}  # label -> EntityScores per entity (for fusion rows)
    notes: list[dict] = []  # degenerate entities and how each row handled them
    rescored_rows = {spec.rescore for spec in specs if spec.rescore}
    fitted_elsewhere = {spec.label for spec in specs if spec.embeddings or spec.fuse}
    for spec in specs:
        t0 = time.perf_counter()
        if spec.fuse:
            unknown = [m for m in spec.fuse if m not in per_entity]
            if unknown:
                raise SystemExit(f"{spec.label}: fuse names rows not evaluated before it: "
                                 f"{unknown}")
            parts = [fuse_entity(spec, [per_entity[m][i] for m in spec.fuse])
                     for i in range(len(entities))]
        else:
            if spec.rescore is not None and spec.rescore not in per_entity:
                raise SystemExit(f"{spec.label}: rescore names a row not evaluated before "
                                 f"it: {spec.rescore!r}")
            if spec.rescore in fitted_elsewhere:  # their models are not kept: no zeros
                raise SystemExit(f"{spec.label}: rescore needs a row that fits a detector; "
                                 f"{spec.rescore!r} reads embeddings or fuses rows")
            keep = spec.label in rescored_rows
            sources = per_entity[spec.rescore] if spec.rescore else [None] * len(entities)
            parts = [score_entity_full(spec, e.train.astype(np.float64),
                                       e.test.astype(np.float64), entity=e.name,
                                       keep_models=keep, fitted=src)
                     for e, src in tqdm(list(zip(entities, sources, strict=True)),
                                        desc=spec.label, unit="entity")]
        per_entity[spec.label] = parts
        for e, part in zip(entities, parts, strict=True):
            for note in part.notes:
                log.warning("%s, %s: %s", spec.label, e.name, note)
                notes.append({"row": spec.label, "entity": e.name, "note": note})
        scored[spec.label] = {"scores": np.concatenate([p.test for p in parts]),
                              "seconds": time.perf_counter() - t0,
                              "spec": {k: v for k, v in vars(spec).items()
                                       if k != "label" and v not in (None, "")}}
    for path in args.artifact:
        det = load_detector(path)
        t0 = time.perf_counter()
        parts = [score_series(det, select(e.test.astype(np.float64), None), 1, "newest")
                 for e in tqdm(entities, desc=path.name, unit="entity")]
        scored[f"artifact {path.name}"] = {"scores": np.concatenate(parts),
                                           "seconds": time.perf_counter() - t0,
                                           "spec": {"artifact": str(path)}}
    log.info("computing metrics for %d rows (TSB-AD; VUS and Affiliation take minutes)",
             len(scored))
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {label: pool.submit(_metrics, row["scores"], labels)
                   for label, row in scored.items()}
        results = {label: f.result() for label, f in futures.items()}
    report = {
        "dataset": dataset, "entities": [e.name for e in entities], "points": int(len(labels)),
        "anomaly_share": float(labels.mean()),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "protocol": PROTOCOL,
        "rows": [{"label": label, "metrics": results[label], "seconds": round(row["seconds"], 1),
                  **row["spec"],
                  "entity_auc": entity_aucs(entities, per_entity.get(label))}
                 for label, row in scored.items()],
        "anchors": msl_anchors() if dataset.lower() == "msl" else {},
        "notes": notes,
    }
    write_report(report, args.out)
    return 0


def entity_aucs(entities: list, parts: list | None) -> dict[str, float | None]:
    """AUC-ROC of each entity's own test scores (None where its labels are one class):
    where a row ranks well or upside down, which the concatenated metrics hide."""
    from sklearn.metrics import roc_auc_score

    if parts is None:
        return {}
    out: dict[str, float | None] = {}
    for e, part in zip(entities, parts, strict=True):
        y = np.asarray(e.labels).astype(int)
        out[e.name] = (round(float(roc_auc_score(y, part.test)), 4) if 0 < y.sum() < len(y)
                       else None)
    return out


def msl_anchors() -> dict[str, dict[str, float]]:
    names = ("AUC-ROC", "Standard-F1", "Affiliation-F1", "VUS-ROC", "VUS-PR")
    return {k: dict(zip(names, v, strict=True)) for k, v in MSL_ANCHORS.items()}


def write_report(report: dict, out: Path) -> None:
    """OUT.json, OUT.md (the table beside the anchors), and the table on stdout."""
    from models.reporting import save_report

    save_report(report, markdown(report), out)


def _metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from models.evaluation import evaluate_scores

    return evaluate_scores(scores, labels)


def markdown(report: dict) -> str:
    head = ("| method | AUC-ROC | Standard-F1 | Affiliation-F1 | VUS-ROC | VUS-PR | input | "
            "seconds |\n|---|---|---|---|---|---|---|---|")
    lines = [f"# {report['dataset'].upper()}: {len(report['entities'])} entities, "
             f"{report['points']} test points ({100 * report['anomaly_share']:.1f}% anomalous)",
             "", report["protocol"] + ".", "", head]
    for row in report["rows"]:
        m = row["metrics"]
        cols = row.get("columns")
        if "artifact" in row:
            inp = "artifact"
        elif "fuse" in row:
            inp = f"fusion of {len(row['fuse'])} rows ({row['method']}, {row['weights']} weights)"
        else:
            inp = ("all columns" if cols is None else f"columns {cols}") + (
                ", tsad embed features" if "embeddings" in row else "")
        lines.append(f"| {row['label']} | " + " | ".join(
            f"{100 * m[k]:.2f}" for k in ("AUC-ROC", "Standard-F1", "Affiliation-F1",
                                          "VUS-ROC", "VUS-PR"))
            + f" | {inp} | {row['seconds']} |")
    for name, m in report["anchors"].items():
        lines.append(f"| {name} (paper) | " + " | ".join(f"{v:.2f}" for v in m.values())
                     + " | paper, Table 1 | |")
    if report.get("notes"):
        lines += ["", "Degenerate entities (handled as noted):", ""]
        lines += [f"- {n['entity']}, {n['row']}: {n['note']}" for n in report["notes"]]
    return "\n".join(lines)
