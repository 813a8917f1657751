"""`tsad evaluate`: score a dataset's test split with several detectors in one run and write
one table (JSON + markdown); on MSL, beside the CMA-TSAD paper's rows (its Table 1).

The dataset is a folder in the MSL layout (models/data.py: entities.csv, train.npy,
test.npy, test_label.npy), named by --dataset (msl, smap, ...) under --data-dir. A clone
has no ../shared/datasets: ``--data-dir tests/data`` has a two-entity MSL slice.

Rows come from a YAML config (``configs/eval/*.yaml``)::

    dataset: msl
    rows:
      - label: embedding memory (ours)
        id: mem                       # optional short name for --rows, fuse and rescore
        detector: embedding_memory
        params: {window: 64, stride: 16}
        columns: [0]
        stride: 16
        spread: max

A row may read its features from ``tsad embed`` output instead of running the language
model (``embeddings: runs/emb/msl-w64-s16``; memory detectors), and a row may fuse earlier
rows (``fuse: [mem, rl]``, by id or label; ``method: z | rank``, ``weights: train |
equal``): per entity, each member's normalised scores are calibrated on its training-data
scores and added with weights learnt from them (``models.fusion``). A row may also score
an earlier row's fitted models again with scoring-only settings changed (``rescore: mem``,
``params: {score: probability}``): two scorings of one fit side by side.

or from ``--artifact DIR`` (a trained detector; scored as-is, no refit).

The whole config is checked before any row runs (unknown keys, detector parameters,
columns, embeddings, references between rows): each problem is one line naming the row
and the key; ``--check`` stops there. Each row is saved as soon as it is scored, and again
with its metrics (under runs/eval/OUT-NAME/, or --work), and OUT.json/OUT.md are rewritten
as rows finish: a run cut short keeps its finished rows, and running the same command
again reads them back and computes only the rest (a row whose config, data or detector
code changed is computed again; ``--force`` computes every row again). ``--rows`` runs
some rows (ids, numbers or labels) and the rows they fuse or rescore.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
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
    "windows), as (score - median) / IQR, except rows marked \"not normalised\" "
    "(calibration 0: the scores as the detector gives them); fusion rows add their members' "
    "normalised scores per entity, calibrated and weighted on training scores only; "
    "concatenated; TSB-AD metrics; no point adjustment; no test labels used")


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
    p.add_argument("--rows", default="",
                   help="only these rows (comma-separated ids, numbers from 1 or labels), "
                   "with the rows they fuse or rescore; default all")
    p.add_argument("--check", action="store_true",
                   help="check the whole config against the data and stop (nothing runs)")
    p.add_argument("--force", action="store_true",
                   help="compute every row again, even those finished by an earlier run")
    p.add_argument("--work", type=Path, default=None,
                   help="where finished rows are kept between runs (default "
                   "runs/eval/OUT-NAME)")
    p.add_argument("--out", type=Path, required=True,
                   help="output path without suffix: writes OUT.json and OUT.md")
    p.add_argument("--jobs", type=int, default=2, help="processes computing metrics")
    p.set_defaults(func=run)


def load_rows(args: argparse.Namespace) -> tuple[str, list, list[str]]:
    """The dataset, the config's rows that read well, and one line per problem of the
    others (naming the row and the key)."""
    import yaml

    from models.evaluate_config import rows_from

    dataset, rows, found = args.dataset, [], []
    if args.config:
        try:
            cfg = yaml.safe_load(args.config.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise SystemExit(f"{args.config}: not valid YAML{where}: "
                             f"{getattr(exc, 'problem', None) or exc}") from None
        rows, found = rows_from(cfg, str(args.config))
        dataset = dataset or (cfg.get("dataset") if isinstance(cfg, dict) else None)
    if not rows and not found and not args.artifact:
        raise SystemExit("nothing to evaluate: give --config and/or --artifact")
    return dataset or "msl", rows, found


def run(args: argparse.Namespace) -> int:
    from models.data import load_msl, select_entities
    from models.detectors.base import ARTIFACT_CONFIG, ARTIFACT_WEIGHTS
    from models.evaluate_config import ConfigError, problems, select
    from models.evaluate_store import RowStore, artifact_key, data_digest, row_keys

    dataset, specs, found = load_rows(args)
    if dataset == "nab":
        raise SystemExit("--dataset: evaluate reads datasets in the MSL layout (entities); "
                         "NAB is scored by benchmarks/alerts_nab.py")
    numbers = config_numbers(args.config)
    if not found:  # --rows numbers count the config's rows: only when all read well
        try:
            specs = select(specs, args.rows)
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
    entities = select_entities(load_msl(args.data_dir, dataset), args.entities)
    source = f"{args.config}: " if args.config else ""
    found += [source + p for p in problems(specs, entities, dataset, args.data_dir, numbers)]
    found += [f"--artifact {path}: no {name} there (`tsad train` writes artifacts)"
              for path in args.artifact for name in (ARTIFACT_CONFIG, ARTIFACT_WEIGHTS)
              if not (path / name).is_file()]
    if found:  # before minutes of scoring, not after
        raise SystemExit("\n".join(sorted(found, key=_row_order)))
    data = data_digest(entities)
    keys = row_keys(specs, dataset, data)
    keys.update({f"artifact {p.name}": artifact_key(p, dataset, data) for p in args.artifact})
    store = RowStore(args.work or Path("runs/eval") / args.out.name)
    finished = {label: None if args.force else store.load(key) for label, key in keys.items()}
    if args.check:
        done = sum(v is not None for v in finished.values())
        rows = f"{len(keys)} row" + "s" * (len(keys) != 1)
        print(f"{args.config or 'artifacts'}: {rows} check out on {dataset} ({len(entities)} "
              f"entities): {len(keys) - done} to compute, {done} finished in {store.folder}"
              + (" (--force computes them again)" if done else ""))
        return 0
    return Evaluation(args, dataset, entities, specs, keys, store, finished).run()


def config_numbers(config: Path | None) -> dict[str, int]:
    """label -> the row's number in the config (problems name rows by it)."""
    import yaml

    cfg = yaml.safe_load(config.read_text()) if config else None
    rows = cfg.get("rows") if isinstance(cfg, dict) else None
    return {r["label"]: n for n, r in enumerate(rows or [], 1)
            if isinstance(r, dict) and isinstance(r.get("label"), str)}


def _row_order(line: str) -> tuple[int, str]:
    """Problems in the config's row order."""
    import re

    m = re.search(r": row (\d+)", line)
    return (int(m.group(1)) if m else 0, line)


class Evaluation:
    """One run: rows scored in order, each saved as soon as it is scored; metrics computed
    in worker processes while the next rows score, each row saved again with them."""

    def __init__(self, args: argparse.Namespace, dataset: str, entities: list,
                 specs: list, keys: dict[str, str], store, finished: dict) -> None:  # noqa: ANN001
        self.args, self.dataset, self.entities, self.specs = args, dataset, entities, specs
        self.keys, self.store, self.finished = keys, store, finished
        self.labels = np.concatenate([e.labels for e in entities]).astype(int)
        self.records: dict[str, dict] = {}  # label -> record (metrics once computed)
        self.per_entity: dict[str, list] = {}  # label -> EntityScores per entity
        self.pending: dict[Future, str] = {}  # metrics being computed -> label

    def run(self) -> int:
        from tqdm import tqdm

        with ProcessPoolExecutor(max_workers=max(1, self.args.jobs)) as pool:
            try:
                self._score_rows(pool)
            finally:  # a row that failed keeps the metrics of those before it
                bar = tqdm(total=len(self.keys), initial=len(self.keys) - len(self.pending),
                           desc="metrics", unit="row")
                for future in as_completed(list(self.pending)):
                    self._metrics_done(future)
                    bar.update()
                bar.close()
        write_report(self._report(), self.args.out)
        return 0

    def _score_rows(self, pool: ProcessPoolExecutor) -> None:
        from tqdm import tqdm

        from models.detectors import load_detector
        from models.evaluation import EntityScores, score_series, select

        # a row still to rescore needs its source's fitted models, which are not saved
        refit = {s.rescore for s in self.specs if s.rescore and not self.finished[s.label]}
        for spec in self.specs:
            if self._read_back(spec.label, pool, keep_models=spec.label in refit):
                continue
            try:
                self._score_row(spec, refit, pool)
            except Exception:
                log.error("row %r failed (below); the rows finished before it are kept in %s "
                          "and the same command goes on from there", spec.label,
                          self.store.folder)
                raise
        for path in self.args.artifact:
            label = f"artifact {path.name}"
            if self._read_back(label, pool):
                continue
            det = load_detector(path)
            t0 = time.perf_counter()
            parts = [EntityScores(score_series(det, select(e.test.astype(np.float64), None),
                                               1, "newest"), np.zeros(0))
                     for e in tqdm(self.entities, desc=path.name, unit="entity")]
            self._scored(label, parts, time.perf_counter() - t0, {"artifact": str(path)},
                         pool, entity_auc=False)

    def _score_row(self, spec, refit: set[str], pool: ProcessPoolExecutor) -> None:  # noqa: ANN001
        from tqdm import tqdm

        from models.evaluation import fuse_entity, score_entity_full

        t0 = time.perf_counter()
        if spec.fuse:
            parts = [fuse_entity(spec, [self.per_entity[m][i] for m in spec.fuse])
                     for i in range(len(self.entities))]
        else:
            sources = (self.per_entity[spec.rescore] if spec.rescore
                       else [None] * len(self.entities))
            parts = [score_entity_full(spec, e.train.astype(np.float64),
                                       e.test.astype(np.float64), entity=e.name,
                                       keep_models=spec.label in refit, fitted=src)
                     for e, src in tqdm(list(zip(self.entities, sources, strict=True)),
                                        desc=spec.label, unit="entity")]
        spec_out = {k: v for k, v in vars(spec).items() if k != "label" and v not in (None, "")}
        self._scored(spec.label, parts, time.perf_counter() - t0, spec_out, pool)

    def _read_back(self, label: str, pool: ProcessPoolExecutor,
                   keep_models: bool = False) -> bool:
        """A row finished by an earlier run: its saved scores (and metrics, else computed
        now). False when it must run (not finished, or its fitted models are needed)."""
        found = self.finished.get(label)
        if found is None or keep_models:
            return False
        record, parts = found
        log.info("%s: read back from %s (finished earlier; --force computes it again)",
                 label, self.store.folder)
        self.records[label], self.per_entity[label] = record, parts
        if "metrics" not in record:
            self._submit(label, pool)
        return True

    def _scored(self, label: str, parts: list, seconds: float, spec: dict,
                pool: ProcessPoolExecutor, entity_auc: bool = True) -> None:
        notes = [{"row": label, "entity": e.name, "note": note}
                 for e, part in zip(self.entities, parts, strict=True) for note in part.notes]
        for n in notes:
            log.warning("%s, %s: %s", label, n["entity"], n["note"])
        record = {"label": label, "seconds": round(seconds, 1), "spec": spec, "notes": notes,
                  "entity_auc": entity_aucs(self.entities, parts) if entity_auc else {}}
        self.records[label] = self.store.save(self.keys[label], record, parts)
        self.per_entity[label] = parts
        self._submit(label, pool)
        for future in [f for f in self.pending if f.done()]:  # save what is ready now
            self._metrics_done(future)

    def _submit(self, label: str, pool: ProcessPoolExecutor) -> None:
        scores = np.concatenate([p.test for p in self.per_entity[label]])
        self.pending[pool.submit(_metrics, scores, self.labels)] = label

    def _metrics_done(self, future: Future) -> None:
        label = self.pending.pop(future)
        try:
            metrics, seconds = future.result()
        except Exception as exc:  # noqa: BLE001 - saved scores stay; a rerun computes them
            log.error("%s: metrics failed (%s); its scores are kept", label, exc)
            return
        record = self.records[label] | {"metrics": metrics,
                                        "metrics_seconds": round(seconds, 1)}
        self.records[label] = record
        self.store.save(self.keys[label], record)
        write_report(self._report(), self.args.out, echo=False)  # as far as it got

    def _report(self) -> dict:
        rows = [self.records[label] for label in self.keys
                if "metrics" in self.records.get(label, {})]
        pending = [label for label in self.keys if label not in {r["label"] for r in rows}]
        return {
            "dataset": self.dataset, "entities": [e.name for e in self.entities],
            "points": int(len(self.labels)), "anomaly_share": float(self.labels.mean()),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "protocol": PROTOCOL,
            "rows": [{"label": r["label"], "metrics": r["metrics"], "seconds": r["seconds"],
                      "metrics_seconds": r["metrics_seconds"], **r["spec"],
                      "entity_auc": r["entity_auc"]} for r in rows],
            "anchors": msl_anchors() if self.dataset.lower() == "msl" else {},
            "notes": [n for r in rows for n in r["notes"]],
        } | ({"pending": pending} if pending else {})


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


def write_report(report: dict, out: Path, echo: bool = True) -> None:
    """OUT.json, OUT.md (the table beside the anchors), and the table on stdout."""
    from models.reporting import save_report

    save_report(report, markdown(report), out, echo=echo)


def _metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], float]:
    """The protocol's metrics of one row, and the seconds they took (in a worker)."""
    from models.evaluation import evaluate_scores

    t0 = time.perf_counter()
    return evaluate_scores(scores, labels), time.perf_counter() - t0


def markdown(report: dict) -> str:
    head = ("| method | AUC-ROC | Standard-F1 | Affiliation-F1 | VUS-ROC | VUS-PR | input | "
            "seconds (scores + metrics) |\n|---|---|---|---|---|---|---|---|")
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
                ", tsad embed features" if "embeddings" in row else "") + (
                ", not normalised" if row.get("calibration") == 0 else "")
        lines.append(f"| {row['label']} | " + " | ".join(
            f"{100 * m[k]:.2f}" for k in ("AUC-ROC", "Standard-F1", "Affiliation-F1",
                                          "VUS-ROC", "VUS-PR"))
            + f" | {inp} | {row['seconds']} + {row.get('metrics_seconds', '?')} |")
    for name, m in report["anchors"].items():
        lines.append(f"| {name} (paper) | " + " | ".join(f"{v:.2f}" for v in m.values())
                     + " | paper, Table 1 | |")
    if report.get("pending"):
        lines += ["", f"Not finished yet: {', '.join(report['pending'])}."]
    if report.get("notes"):
        lines += ["", "Degenerate entities (handled as noted):", ""]
        lines += [f"- {n['entity']}, {n['row']}: {n['note']}" for n in report["notes"]]
    return "\n".join(lines)
