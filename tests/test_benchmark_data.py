"""Benchmarks in a clone without ../shared: missing data is one line naming what is
missing and how to get it, and the repository's slices (tests/data) either run or say in
one line why they cannot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from models.data import load_nab
from tests.conftest import DATA_DIR

pytestmark = pytest.mark.slow  # the scripts as processes

ROOT = DATA_DIR.parents[1]
# every benchmark reading a data directory, with the flags it requires besides it
SCRIPTS = {"alerts_nab.py": [], "default_cost.py": ["--previous", "x"], "embeddings.py": [],
           "lm_member.py": ["--embeddings", "x"], "memory_nab_stream.py": [], "nab.py": [],
           "spear.py": [], "spear_diagnosis.py": ["--out", "x"], "spear_feedback_nab.py": [],
           "spear_inputs.py": ["--out", "x"], "throughput.py": [], "wide_profile.py": []}
MAKE_ERROR = re.compile(r"make(\[\d+\])?: \*\*\* ")  # make's own note that a recipe failed


def run(cmd: list[str], **kw) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kw)


def test_every_benchmark_names_missing_data_in_one_line(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    procs = {name: run([sys.executable, f"benchmarks/{name}", "--data-dir", nowhere, *extra])
             for name, extra in SCRIPTS.items()}  # at once: each spends its time importing
    procs["make"] = run(["make", "-s", "bench-alerts", f"DATA={nowhere}"])
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, out, err)
        lines = [line for line in err.splitlines() if not MAKE_ERROR.match(line)]
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert re.search(r": --data-dir: no (msl|nab) dataset \(", lines[0]), lines[0]
        assert "--data-dir tests/data" in lines[0] and "get " in lines[0], lines[0]


def test_the_nab_slice_is_found_under_its_corpus_key_and_alerts_run_on_it(tmp_path):
    """tests/data/nab keeps nyc_taxi.csv beside combined_windows.json, without NAB's
    category folder: the loaders find it under its key, and alerts_nab.py, which read
    realKnownCause/ by path and divided by zero days, scores it."""
    (taxi,) = load_nab(DATA_DIR)
    assert taxi.name == "realKnownCause/nyc_taxi.csv" and len(taxi.values) == 10320
    proc = run([sys.executable, "benchmarks/alerts_nab.py", "--data-dir", "tests/data",
                "--out", str(tmp_path)])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads((tmp_path / "alerts_nab.json").read_text())
    assert [r["series"] for r in result["rows"]] == ["nyc_taxi"]
    assert result["total"]["windows"] == 5 and result["total"]["alerts_per_day"] > 0


def test_what_the_slices_cannot_run_is_one_line():
    procs = {"spear.py": run([sys.executable, "benchmarks/spear.py", "--data-dir",
                              "tests/data"]),
             "spear_feedback_nab.py": run([sys.executable, "benchmarks/spear_feedback_nab.py",
                                           "--data-dir", "tests/data"]),
             "make": run(["make", "-s", "bench-memory-msl", "DATA=tests/data"])}
    why = {"spear.py": "too short for the paper set-up", "spear_feedback_nab.py":
           "none of the --streams", "make": "needs the full MSL"}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [line for line in (out + err).splitlines() if not MAKE_ERROR.match(line)]
        assert proc.returncode == 2 and len(lines) == 1, (name, out, err)
        assert why[name] in lines[0], lines[0]
