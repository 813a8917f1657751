"""A stream's state as named sections, each kept and written on its own.

A section is a set of named arrays (safetensors bytes in the store): ``det`` the
detector (a detector state key ``"<part>/<name>"`` goes to its own section ``det/<part>``,
so a large, slowly changing part such as a memory of normal windows is rewritten only
when it changes), ``loop`` the online loop's verdict in force and pending chunk, ``lik``
the likelihood's history, ``thr`` the threshold, ``alr`` the alert tracker, ``fb`` the
operator feedback and ``ada`` a SPEAR stream's adapted prompts. A shadow detector's
sections carry its name as a prefix (``shadow.<name>.det``, ``service/shadows``).

A commit writes only the sections whose bytes changed since they were loaded or last
committed (``changed``), atomically with the scored-up-to mark. State written whole by
versions before sections (one blob, keys prefixed ``det.``, ``thr.``, ...) is split into
the same sections when read (``decode``); the first commit then writes every section.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import safetensors.numpy

from service.stores.base import LEGACY_SECTION

DETECTOR = "det"
LEGACY_VERSION = 1  # the whole-blob format's version array
LEGACY_PREFIXES = ("det", "loop", "lik", "thr", "alr", "fb", "ada")


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def decode(stored: Mapping[str, bytes]) -> dict[str, dict[str, np.ndarray]]:
    """Sections as stored (name -> bytes) -> name -> arrays; a legacy whole blob split."""
    if LEGACY_SECTION in stored:
        arrays = safetensors.numpy.load(stored[LEGACY_SECTION])
        if int(arrays.pop("version", np.zeros(1))[0]) != LEGACY_VERSION:
            return {}
        return {p: {k[len(p) + 1:]: v for k, v in arrays.items() if k.startswith(p + ".")}
                for p in LEGACY_PREFIXES}
    return {name: dict(safetensors.numpy.load(blob)) for name, blob in stored.items()}


def detector_sections(state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A detector's state_dict by section: ``"<part>/<name>"`` keys to ``det/<part>``.

    >>> sorted(detector_sections({"n": 1, "memory/vectors": 2}).items())
    [('det', {'n': 1}), ('det/memory', {'vectors': 2})]
    """
    out: dict[str, dict[str, np.ndarray]] = {DETECTOR: {}}
    for key, value in state.items():
        part, sep, name = key.partition("/")
        if sep:
            out.setdefault(f"{DETECTOR}/{part}", {})[name] = value
        else:
            out[DETECTOR][key] = value
    return out


def detector_state(sections: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Inverse of ``detector_sections``."""
    state = dict(sections.get(DETECTOR, {}))
    for name, arrays in sections.items():
        if name.startswith(DETECTOR + "/"):
            part = name[len(DETECTOR) + 1:]
            state |= {f"{part}/{k}": v for k, v in arrays.items()}
    return state


def changed(encoded: Mapping[str, bytes], stored: Mapping[str, bytes]) -> dict[str, bytes]:
    """The sections to write: those whose bytes differ from what the store holds."""
    return {name: blob for name, blob in encoded.items() if stored.get(name) != blob}
