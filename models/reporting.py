"""One way every benchmark and evaluation writes its result: OUT.json (everything), OUT.md
(the table a person reads) and the table on stdout."""

from __future__ import annotations

import argparse
import json
import subprocess
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


def git_commit() -> str:
    """This checkout's short HEAD commit, which a report names as the tree it measured."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()


def service_benchmark_parser(doc: str, name: str,
                             baseline: bool = True) -> argparse.ArgumentParser:
    """The options a service benchmark starts from: ``doc`` (its module docstring) as
    help, ``--name`` (the results file) and, with ``baseline``, ``--baseline DIR``
    (another commit's tree, ``git archive COMMIT | tar -x -C DIR``) and
    ``--baseline-label``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default=name, help="results file name (benchmarks/results/)")
    if baseline:
        ap.add_argument("--baseline", type=Path, default=None,
                        help="another commit's tree (git archive COMMIT | tar -x -C DIR), "
                        "measured beside this one")
        ap.add_argument("--baseline-label", default="baseline")
    return ap


def trees_to_compare(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """(label, root) of the baseline if one was given, then this checkout (root None)."""
    return ([(args.baseline_label, args.baseline)] if args.baseline else []) + [
        (git_commit(), None)]


def baseline_options(args: argparse.Namespace) -> str:
    """The baseline options of the command line, as a report quotes them."""
    return (f" --baseline DIR --baseline-label '{args.baseline_label}'"
            if args.baseline else "")
