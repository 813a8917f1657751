"""One way every benchmark and evaluation writes its result: OUT.json (everything), OUT.md
(the table a person reads) and the table on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_report(result: dict[str, Any], table: str, out: str | Path) -> None:
    """Write ``out``.json and ``out``.md (``out`` without suffix) and print the table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    out.with_suffix(".md").write_text(table.rstrip("\n") + "\n")
    print(table)
