"""What writing /score's answer costs per batch, by serialiser: the choice of
``service/responses.py``, measured.

The same answer (every point stored and scored, a tenth of them anomalous with their
explanations, a univariate stream) written four ways, in this process, best of
``--repeat`` timings each:

- ``dicts + pydantic to_json``: a dict per point, serialised by pydantic-core (what
  /score did before; ``--baseline DIR`` runs that checkout's own ``score_response``);
- ``dicts + json.dumps``: the same dicts, the standard library's encoder;
- ``dicts + orjson``: the same dicts, orjson (when installed; its numbers are spelt
  otherwise, e.g. 1e-5 for pydantic's 0.00001: not byte-identical);
- ``columns``: ``service/responses.py::score_body``, each column serialised once and its
  tokens joined, no dict per point (byte-identical to the first).

    python benchmarks/response_cost.py --baseline /work/base-d0ab229

Prints a markdown table and writes benchmarks/results/response_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydantic_core import to_json  # noqa: E402

from models.reporting import save_report  # noqa: E402
from service.explain import ChannelShare, Explanation  # noqa: E402
from service.responses import numpy_scalar, score_body  # noqa: E402
from service.scoring import Results  # noqa: E402
from service.stores.base import AppendResult, StreamMeta  # noqa: E402


def batch(n: int, seed: int = 0) -> tuple[AppendResult, Results, list[float]]:
    rng = np.random.default_rng(seed)
    sent = (1.7e9 + 60 * np.arange(n)).tolist()
    anomalous = rng.random(n) < 0.1
    explained = {int(k): Explanation([ChannelShare("0", 1.0)], None)
                 for k in np.flatnonzero(anomalous)}
    results = Results(np.ones(n, bool), rng.random(n) * 5, rng.random(n),
                      np.full(n, 4.2), anomalous, explained)
    meta = StreamMeta(stream="web-01.cpu", channels=1, window=64, detector="ensemble")
    appended = AppendResult(meta=meta, created=False, duplicates=0, accepted=n,
                            points=np.column_stack([sent, rng.random(n)]),
                            actions=["stored"] * n, stamps=list(sent))
    return appended, results, sent


def dict_builder(baseline: Path | None):  # noqa: ANN201 - the baseline's score_response
    """The dict-per-point builder: the baseline checkout's ``score_response``."""
    if baseline is None:
        return None
    spec = importlib.util.spec_from_file_location("baseline_responses",
                                                  baseline / "service" / "responses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its imports (Results, AppendResult) are this tree's
    return module.score_response


def best_ms(fn, repeat: int) -> float:  # noqa: ANN001
    number = 1
    while True:  # enough calls per timing for a tenth of a second
        start = time.process_time()
        for _ in range(number):
            fn()
        if time.process_time() - start > 0.1 or number > 100_000:
            break
        number *= 4
    times = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(number):
            fn()
        times.append((time.process_time() - start) / number)
    return round(min(times) * 1000, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100, 1000, 10_000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout whose service/responses.py builds a dict per point "
                    "(e.g. /work/base-d0ab229); without it only the columns are timed")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    build = dict_builder(args.baseline)
    try:
        import orjson
    except ImportError:
        orjson = None
    rows = []
    for n in args.batch_sizes:
        appended, results, sent = batch(n)
        row = {"batch": n}
        call = ("web-01.cpu", appended, results, sent, 0)
        row["columns_ms"] = best_ms(lambda c=call: score_body(*c), args.repeat)
        if build is not None:
            assert to_json(build(*call), fallback=numpy_scalar) == score_body(*call), (
                "not byte-identical")
            row["dicts_pydantic_ms"] = best_ms(
                lambda c=call: to_json(build(*c), fallback=numpy_scalar), args.repeat)
            row["dicts_json_ms"] = best_ms(lambda c=call: json.dumps(build(*c)).encode(),
                                           args.repeat)
            if orjson is not None:
                row["dicts_orjson_ms"] = best_ms(lambda c=call: orjson.dumps(build(*c)),
                                                 args.repeat)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = [("dicts_pydantic_ms", "dicts + pydantic to_json (before)"),
            ("dicts_json_ms", "dicts + json.dumps"), ("dicts_orjson_ms", "dicts + orjson"),
            ("columns_ms", "columns (service/responses.py)")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| batch | " + " | ".join(f"{label} ms" for _, label in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {r['batch']} | " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |"
              for r in rows]
    load = round(os.getloadavg()[0], 2)
    text = (f"# Writing /score's answer, by serialiser\n\n"
            f"`python benchmarks/{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`: one "
            f"answer per batch size (every point scored, a tenth anomalous with "
            f"explanations), CPU ms per answer, best of {args.repeat}; load {load}. "
            f"orjson: {'orjson ' + orjson.__version__ if orjson else 'not installed'}.\n\n"
            + "\n".join(lines))
    save_report({"benchmark": "response_cost", "date": datetime.now(UTC).isoformat(
        timespec="seconds"), "load_1m": load, "baseline": str(args.baseline or ""),
        "orjson": orjson.__version__ if orjson else None, "rows": rows}, text,
        args.out / "response_cost")


if __name__ == "__main__":
    main()
