"""A stream's state as named sections, each kept and written on its own.

A section is a set of named arrays (safetensors bytes in the store). Each part of a
scorer owns one: ``det`` the detector, ``loop`` the online loop's verdict in force and
pending chunk, ``lik`` the likelihood's history, ``thr`` the threshold, ``alr`` the alert
tracker, ``fb`` the operator feedback and ``ada`` a SPEAR stream's adapted prompts. A
state key ``"<part>/<name>"`` goes to a section of its own, ``<owner>/<part>``, so that
what changes at another rate is written at its own: the detector's memory of normal
windows and its block history (the default's ``det/memory<k>`` and ``det/history<k>``:
slices of a circular buffer, a chunk's end writes the one it entered of each), the
loop's record of the last chunk
(``loop/recent``, when a record enters or leaves it), the tracker's alerts and normal
statistics (``alr/alerts`` while an alert changes, ``alr/normal`` once a chunk) beside
what moves with every point (``loop``, ``alr``: a few hundred bytes). A shadow detector's
sections carry its name as a prefix (``shadow.<name>.det``, ``service/shadows``).

A commit writes only the sections whose bytes changed since they were loaded or last
committed (``changed``), atomically with the scored-up-to mark. State written whole by
versions before sections (one blob, keys prefixed ``det.``, ``thr.``, ...) is split into
the same sections when read (``decode``); the first commit then writes every section.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np
import safetensors.numpy

from service.stores.base import LEGACY_SECTION

DETECTOR = "det"
LEGACY_VERSION = 1  # the whole-blob format's version array
LEGACY_PREFIXES = ("det", "loop", "lik", "thr", "alr", "fb", "ada")


# safetensors' names of the dtypes a state holds
_DTYPES = {"f8": "F64", "f4": "F32", "f2": "F16", "i8": "I64", "i4": "I32", "i2": "I16",
           "i1": "I8", "u8": "U64", "u4": "U32", "u2": "U16", "u1": "U8", "b1": "BOOL"}


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as a safetensors file (what ``safetensors.numpy.load`` reads), written
    here: the same bytes for the same arrays, at a fraction of the library's cost per
    array, which the per-point sections pay on every commit (a section's header depends
    on its arrays' names, dtypes and shapes only, and is made once per layout).
    Little-endian, the widest dtypes first (each array aligned), then by name.

    >>> state = {"n": np.arange(3), "flags": np.array([True, False]), "x": np.ones((2, 2))}
    >>> back = safetensors.numpy.load(encode(state))
    >>> all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    True
    """
    if len(arrays) == 1:  # a slice of a history, most of the sections: nothing to order
        ((name, value),) = arrays.items()
        a = np.asarray(value)
        if a.dtype.byteorder != ">":
            return _head(((name, a.dtype.str, a.shape),)) + a.tobytes()
    parts = []
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        parts.append((-a.dtype.itemsize, name, a))
    parts.sort(key=lambda p: p[:2])
    head = _head(tuple((name, a.dtype.str, a.shape) for _, name, a in parts))
    return head + b"".join(np.ascontiguousarray(a).tobytes() for _, _, a in parts)


_HEADERS: dict[tuple, bytes] = {}


def _head(layout: tuple) -> bytes:
    head = _HEADERS.get(layout)
    if head is None:
        head = _HEADERS[layout] = _header(layout)
        if len(_HEADERS) > 4096:  # layouts are few (one per kind of section); bounded
            del _HEADERS[next(iter(_HEADERS))]
    return head


def _header(layout: tuple) -> bytes:
    header, offset = {}, 0
    for name, dtype, shape in layout:
        size = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": _DTYPES[dtype[1:]], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def decode(stored: Mapping[str, bytes]) -> dict[str, dict[str, np.ndarray]]:
    """Sections as stored (name -> bytes) -> name -> arrays; a legacy whole blob split."""
    if LEGACY_SECTION in stored:
        arrays = safetensors.numpy.load(stored[LEGACY_SECTION])
        if int(arrays.pop("version", np.zeros(1))[0]) != LEGACY_VERSION:
            return {}
        return {p: {k[len(p) + 1:]: v for k, v in arrays.items() if k.startswith(p + ".")}
                for p in LEGACY_PREFIXES}
    return {name: dict(safetensors.numpy.load(blob)) for name, blob in stored.items()}


def split(owner: str, state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A part's state by section: ``"<part>/<name>"`` keys to ``<owner>/<part>``.

    >>> sorted(split("det", {"n": 1, "memory/vectors": 2}).items())
    [('det', {'n': 1}), ('det/memory', {'vectors': 2})]
    """
    out: dict[str, dict[str, np.ndarray]] = {owner: {}}
    for key, value in state.items():
        part, sep, name = key.partition("/")
        if sep:
            out.setdefault(f"{owner}/{part}", {})[name] = value
        else:
            out[owner][key] = value
    return out


def merge(owner: str, sections: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Inverse of ``split``: the part's state from its sections."""
    state = dict(sections.get(owner, {}))
    for name, arrays in sections.items():
        if name.startswith(owner + "/"):
            part = name[len(owner) + 1:]
            state |= {f"{part}/{k}": v for k, v in arrays.items()}
    return state


def owner(section: str) -> str:
    """The part a section belongs to: ``det/memory`` -> ``det``."""
    return section.partition("/")[0]


def detector_sections(state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A detector's state_dict by section (``split`` for ``det``)."""
    return split(DETECTOR, state)


def detector_state(sections: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Inverse of ``detector_sections``."""
    return merge(DETECTOR, sections)


def changed(encoded: Mapping[str, bytes], stored: Mapping[str, bytes]) -> dict[str, bytes]:
    """The sections to write: those whose bytes differ from what the store holds."""
    return {name: blob for name, blob in encoded.items() if stored.get(name) != blob}
