"""One way every benchmark and evaluation writes its result: OUT.json (everything), OUT.md
(the table a person reads) and the table on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_report(result: dict[str, Any], table: str, out: str | Path, echo: bool = True) -> None:
    """Write ``out``.json and ``out``.md (``out`` without suffix) and print the table
    (unless ``echo`` is false: a report rewritten as a run goes)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    out.with_suffix(".md").write_text(table.rstrip("\n") + "\n")
    if echo:
        print(table)


ROOT = Path(__file__).resolve().parents[1]
SLICES = ROOT / "tests" / "data"  # small slices to try commands on, not to report


def results_dir(data_dir: str | Path) -> Path:
    """Where a benchmark writes by default: benchmarks/results/ for real data, runs/bench/
    for the repository's test slices (``--data-dir tests/data``), whose figures must not
    replace the committed ones.

    >>> results_dir(SLICES).relative_to(ROOT).as_posix()
    'runs/bench'
    >>> results_dir("../shared/datasets").relative_to(ROOT).as_posix()
    'benchmarks/results'
    """
    if Path(data_dir).resolve().is_relative_to(SLICES):
        return ROOT / "runs" / "bench"
    return ROOT / "benchmarks" / "results"
