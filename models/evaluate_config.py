"""The rows of a `tsad evaluate` config, checked whole before any row runs.

A mistake in row 12 must not surface after rows 1 to 11 have run for an hour: `rows_from`
reads every row (unknown keys, types, references between rows) and `problems` checks
them against the data (detectors and their parameters, columns, embeddings, fusion
members) before anything is fitted. Each problem is one line naming the row and the key.

Rows may carry a short ``id``; fusion members (``fuse``) and rescore sources (``rescore``)
name earlier rows by id or by label, and ``--rows`` picks rows by id or number.
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

from models.evaluation import DetectorSpec

SPREADS = ("newest", "max", "mean")
METHODS = ("z", "rank")
WEIGHTS = ("train", "equal")
ROW_KEYS = tuple(f.name for f in fields(DetectorSpec))


class ConfigError(ValueError):
    """What is wrong with a selection of rows: one line per problem."""


def rows_from(config: Any, source: str = "config") -> tuple[list[DetectorSpec], list[str]]:
    """DetectorSpecs from a parsed YAML config (references resolved to labels), and the
    problems of the rows left out: every row is read, so every mistake is listed at once."""
    if not isinstance(config, dict):
        return [], [f"{source}: a mapping with `dataset:` and `rows:` expected"]
    problems = [f"{source}: unknown top-level key {k!r}{_did_you_mean(k, ('dataset', 'rows'))}"
                for k in sorted(set(config) - {"dataset", "rows"})]
    rows = config.get("rows") or []
    if not isinstance(rows, list):
        return [], problems + [f"{source}: `rows:` must be a list of rows"]
    specs: list[DetectorSpec] = []
    by_ref: dict[str, str | None] = {}  # id or label -> label (None: a row left out)
    for n, row in enumerate(rows, 1):
        where = f"{source}: row {n}"
        if not isinstance(row, dict):
            problems.append(f"{where}: a mapping of keys expected, got {row!r}")
            continue
        label = row.get("label")
        where += f" ({label!r})" if label else ""
        wrong = [f"unknown key {k!r}{_did_you_mean(k, ROW_KEYS)}"
                 for k in row if k not in ROW_KEYS]
        if not isinstance(label, str) or not label.strip():
            wrong.append("`label` (the row's name in the table) is missing")
        wrong += _row_types(row)
        row = dict(row)
        for key in ("fuse", "rescore"):  # earlier rows, by id or label
            refs = row.get(key)
            if not isinstance(refs, str | list):
                continue
            names = [refs] if isinstance(refs, str) else refs
            missing = [r for r in names if r not in by_ref]
            if missing:
                wrong.append(f"`{key}` names rows not defined before it: {missing}")
            elif any(by_ref[r] is None for r in names):
                wrong.append(f"`{key}` names a row with problems (above)")
            elif isinstance(refs, str):
                row[key] = by_ref[refs]
            else:
                row[key] = [by_ref[r] for r in refs]
        for kind, ref in (("label", label), ("id", row.get("id"))):
            if isinstance(ref, str) and ref in by_ref:
                wrong.append(f"{kind} {ref!r} is used by an earlier row")
        wrong += _detector_problems(row, {s.label: s for s in specs})
        problems += [f"{where}: {w}" for w in wrong]
        for ref in (label, row.get("id")):
            if isinstance(ref, str) and ref not in by_ref:
                by_ref[ref] = None if wrong else label
        if not wrong:
            specs.append(DetectorSpec(**row))
    return specs, problems


def _detector_problems(row: dict, earlier: dict[str, DetectorSpec]) -> list[str]:
    """The row's detector is registered and takes its ``params`` (a rescore row's: the
    source row's detector with them), found by building it (a config only, no fit)."""
    from models.detectors import REGISTRY, build_detector

    params = row.get("params") or {}
    if not isinstance(params, dict):
        return []
    name, source = row.get("detector"), earlier.get(row.get("rescore"))
    if isinstance(source, DetectorSpec):
        if not source.detector or source.embeddings:
            return [f"rescore needs a row that fits a detector; {source.label!r} reads "
                    "embeddings or fuses rows"]
        name, params = source.detector, {**source.params, **params}
    if not isinstance(name, str) or not name:
        return []
    if name not in REGISTRY:
        return [f"`detector` {name!r} is not registered{_did_you_mean(name, sorted(REGISTRY))};"
                f" known: {', '.join(sorted(REGISTRY))}"]
    try:
        build_detector(name, **params)
    except (TypeError, ValueError) as exc:
        return [f"`params`: {_one_line(exc)}"]
    return []


def _row_types(row: dict) -> list[str]:
    """Problems of a row's own values (no data needed)."""
    out = []
    kind = [k for k in ("detector", "fuse", "rescore") if row.get(k)]
    if len(kind) != 1:
        out.append("needs exactly one of `detector` (fit one), `fuse` (combine earlier rows) "
                   f"or `rescore` (score an earlier row's models again); has {kind or 'none'}")
    for key, kinds in (("id", str), ("detector", str), ("embeddings", str), ("rescore", str)):
        if row.get(key) is not None and not isinstance(row[key], kinds):
            out.append(f"`{key}` must be a string, got {row[key]!r}")
    if not isinstance(row.get("params", {}), dict):
        out.append(f"`params` must be a mapping, got {row['params']!r}")
    cols = row.get("columns")
    if cols is not None and not (isinstance(cols, list) and cols and all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cols)):
        out.append(f"`columns` must be a list of column numbers (or absent: all), got {cols!r}")
    stride = row.get("stride", 1)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        out.append(f"`stride` must be a whole number >= 1, got {stride!r}")
    cal = row.get("calibration", 0.2)
    if not isinstance(cal, int | float) or isinstance(cal, bool) or not 0 <= cal < 1:
        out.append(f"`calibration` must be a share in [0, 1), got {cal!r}")
    for key, allowed in (("spread", SPREADS), ("method", METHODS), ("weights", WEIGHTS)):
        if key in row and row[key] not in allowed:
            out.append(f"`{key}` must be one of {list(allowed)}, got {row[key]!r}")
    fuse = row.get("fuse")
    if fuse is not None and not (isinstance(fuse, list) and len(fuse) >= 1
                                 and all(isinstance(m, str) for m in fuse)):
        out.append(f"`fuse` must be a list of row ids or labels, got {fuse!r}")
    return out


def problems(specs: list[DetectorSpec], entities: list, dataset: str,
             data_dir: str | Path, numbers: dict[str, int] | None = None) -> list[str]:
    """What would fail while running these rows on these entities, one line each, found
    without fitting anything: columns beyond the data's, embeddings that are missing or
    made from other data, fusion members without calibration scores. ``numbers``: each
    row's number in the config (default: its place in ``specs``)."""
    from models.evaluation import check_embeddings

    by_label = {s.label: s for s in specs}
    channels = min((e.train.shape[1] for e in entities), default=0)
    out = []
    for n, spec in enumerate(specs, 1):
        where = f"row {(numbers or {}).get(spec.label, n)} ({spec.label!r})"
        if spec.columns is not None and max(spec.columns) >= channels:
            out.append(f"{where}: `columns` {list(spec.columns)}: the {dataset} data has "
                       f"{channels} columns (0..{channels - 1})")
        if spec.embeddings:
            check_embeddings(spec, dataset, data_dir)  # missing: one line naming the command
            try:
                _check_embedding_entities(spec, entities)
            except ValueError as exc:
                out.append(f"{where}: `embeddings`: {_one_line(exc)}")
        for member in spec.fuse or []:
            if by_label[member].calibration <= 0:
                out.append(f"{where}: `fuse`: member {member!r} has calibration 0; fusion "
                           "weighs members by their calibration scores")
    return out


def _check_embedding_entities(spec: DetectorSpec, entities: list) -> None:
    """The embeddings hold every evaluated entity, made from data of the same length
    (embeddings of the full MSL do not fit the repository's slice, nor the reverse)."""
    import json

    index = json.loads((Path(spec.embeddings) / "index.json").read_text())
    if spec.params.get("window", index["window"]) != index["window"]:
        raise ValueError(f"window {spec.params['window']} but the embeddings in "
                         f"{spec.embeddings} have window {index['window']}")
    channels = index.get("channels")
    missing = sorted(set(spec.columns or []) - set(channels)) if channels else []
    if missing:
        raise ValueError(f"columns {missing} are not in {spec.embeddings} (it has {channels})")
    for split in ("train", "test"):
        segments = {s["stream"]: s for s in index["splits"][split]["segments"]}
        for e in entities:
            seg = segments.get(e.name)
            length = len(e.train if split == "train" else e.test)
            if seg is None:
                raise ValueError(f"{spec.embeddings} has no {split} windows of {e.name}: "
                                 "made from other data or entities; remake them")
            if seg.get("length", length) != length:
                raise ValueError(f"{spec.embeddings} was made from a {split} split of "
                                 f"{seg['length']} points for {e.name}, this data has "
                                 f"{length}: remake them from this --data-dir")


def select(specs: list[DetectorSpec], which: str) -> list[DetectorSpec]:
    """``--rows``: rows by id, number (from 1) or label without commas, comma-separated,
    with the rows they fuse or rescore; all rows for an empty ``which``."""
    if not which.strip():
        return specs
    refs = ({s.label: s.label for s in specs} | {s.id: s.label for s in specs if s.id}
            | {str(n): s.label for n, s in enumerate(specs, 1)})
    wanted = [w.strip() for w in which.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in refs]
    if unknown:
        known = ", ".join(s.id for s in specs if s.id) or "none"
        raise ConfigError(f"--rows: {unknown} are neither row ids ({known}), row numbers "
                          f"1..{len(specs)} nor labels")
    by_label = {s.label: s for s in specs}
    keep: set[str] = set()
    todo = [refs[w] for w in wanted]
    while todo:  # the rows they need
        label = todo.pop()
        if label not in keep:
            keep.add(label)
            spec = by_label[label]
            todo += list(spec.fuse or []) + ([spec.rescore] if spec.rescore else [])
    return [s for s in specs if s.label in keep]


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
