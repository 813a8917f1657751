"""A long array of a ``state_dict`` as slices: keys ``"<name><k>/<field>"`` (slice k holds
elements [k * size, (k + 1) * size)). A store that keeps ``part/name`` keys apart
(service/stream_state.py: each ``<name><k>`` its own section) then rewrites only the
slices whose bytes changed: a ring or a growing history that moves by a few elements a
request writes one slice, not the whole array.

>>> state = sliced("peaks", 2, excess=np.arange(5.0), censored=np.zeros(5))
>>> sorted(state)[:3]
['peaks0/censored', 'peaks0/excess', 'peaks1/censored']
>>> unsliced(state, "peaks", "excess").tolist(), unsliced(state, "ring", "scores")
([0.0, 1.0, 2.0, 3.0, 4.0], None)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def sliced(name: str, size: int, **fields: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays of one length, each cut into slices of ``size`` (copies), slice k of every
    field under ``"<name><k>/<field>"``."""
    out = {}
    for field, values in fields.items():
        for k, lo in enumerate(range(0, len(values), size)):
            out[f"{name}{k}/{field}"] = np.array(values[lo:lo + size])
    return out


def unsliced(state: Mapping[str, np.ndarray], name: str, field: str) -> np.ndarray | None:
    """Inverse of ``sliced`` for one field: the slices joined, in order (None: none)."""
    parts = []
    while (key := f"{name}{len(parts)}/{field}") in state:
        parts.append(np.asarray(state[key]))
    return np.concatenate(parts) if parts else None
