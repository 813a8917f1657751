"""What a shadow is bound to, and where its state lives among the stream's sections.

A shadow's sections carry its name as a prefix (``shadow.<name>.``): ``cfg`` (this
binding), the detector's own sections as a live stream has them (``det``, ``det/<part>``,
``loop``, ``lik``, ``thr``, ``alr``, ``ada``), ``run`` (the next point it scores and its
counters), ``alerts`` (its alert records, kept for the report, never delivered) and
``log/<k>/<j>`` (the per-point comparison with the live detector: block k of
``LOG_BLOCK`` points of the stream's index, kept or dropped whole, in slices j of
``LOG_SLICE`` points, so that a commit rewrites only the slices its points reached:
O(chunk) bytes, not O(block); a whole block ``log/<k>``, as versions before the slices
wrote it, is read before its slices). The stream's own section ``shadows`` holds the names of
its shadows and the live detector's results of the points the store holds.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from service.stores.base import BINDING, StreamMeta

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
_NAME = re.compile(NAME_PATTERN)
REGISTRY = "shadows"  # the stream's section: shadow names, pending live results
PREFIX = "shadow."
LOG_BLOCK = 1024  # points of the stream's index per comparison-log block
LOG_SLICE = 64  # points per section of a block (about 2 KB)
# a shadow's sections that are not the detector's state
OWN_PARTS = ("cfg", "run", "alerts")


@dataclass(frozen=True)
class ShadowConfig:
    """A shadow's binding (the detector spec PUT /streams/{id} takes) and identity: ``id``
    is new for every shadow created, so work queued for a shadow deleted, promoted or
    replaced since is recognised and dropped."""

    name: str
    detector: str
    params: dict | None = None
    threshold: dict | None = None
    alert_budget_per_day: float | None = None
    costly: bool = False  # scored on the background queue, off the request path
    id: str = field(default_factory=lambda: secrets.token_hex(6))
    created_at: float = field(default_factory=time.time)
    start: int = 0  # the stream index of the first point it scores

    def binding(self) -> dict:
        return {k: getattr(self, k) for k in BINDING}

    def same_binding(self, other: ShadowConfig) -> bool:
        return self.binding() == other.binding()

    def meta(self, stream: StreamMeta) -> StreamMeta:
        """The stream as this shadow's detector sees it: its own binding."""
        return StreamMeta(**{**stream.to_dict(), **self.binding()})

    def encode(self) -> dict[str, np.ndarray]:
        return {"json": np.frombuffer(json.dumps(asdict(self)).encode(), np.uint8)}

    @classmethod
    def decode(cls, arrays: dict[str, np.ndarray]) -> ShadowConfig:
        return cls(**json.loads(arrays["json"].tobytes()))


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def prefix(name: str) -> str:
    return f"{PREFIX}{name}."


def section(name: str, part: str) -> str:
    """``section("memory", "det")`` -> ``"shadow.memory.det"``."""
    return prefix(name) + part


def log_part(index_slice: int) -> str:
    """The section (without the shadow's prefix) of the log's points from stream index
    ``index_slice * LOG_SLICE`` on.

    >>> log_part(0), log_part(17)
    ('log/0/0', 'log/1/1')
    """
    block, j = divmod(index_slice, LOG_BLOCK // LOG_SLICE)
    return f"log/{block}/{j}"


def log_sections(name: str, block: int) -> list[str]:
    """A log block's sections, in stream order: the whole block an earlier version wrote,
    then the slices."""
    first = block * (LOG_BLOCK // LOG_SLICE)
    return [section(name, f"log/{block}")] + [
        section(name, log_part(first + j)) for j in range(LOG_BLOCK // LOG_SLICE)]


def owner(section_name: str) -> str | None:
    """The shadow a section belongs to (None: the live detector's or the stream's).

    >>> owner("shadow.memory.det/memory"), owner("det"), owner("shadows")
    ('memory', None, None)
    """
    if not section_name.startswith(PREFIX):
        return None
    return section_name[len(PREFIX):].partition(".")[0]


def split(sections: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, dict[str, bytes]]]:
    """A stream's sections -> (the live detector's and the stream's, each shadow's by name
    with the prefix taken off)."""
    live: dict[str, bytes] = {}
    shadows: dict[str, dict[str, bytes]] = {}
    for key, blob in sections.items():
        name = owner(key)
        if name is None:
            live[key] = blob
        else:
            shadows.setdefault(name, {})[key[len(prefix(name)):]] = blob
    return live, shadows


def encode_json(value: object) -> dict[str, np.ndarray]:
    return {"json": np.frombuffer(json.dumps(value).encode(), np.uint8)}


def decode_json(arrays: dict[str, np.ndarray], default: object) -> object:
    return json.loads(arrays["json"].tobytes()) if "json" in arrays else default
