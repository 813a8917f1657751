"""Errors the API turns into 4xx/503 answers that name the offending field."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.exceptions import RequestValidationError


def field_error(loc: Sequence[str | int], msg: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, for checks pydantic cannot express alone."""
    return RequestValidationError([{"type": "value_error", "loc": tuple(loc), "msg": msg}])


def describe(errors: Sequence[dict]) -> str:
    """'body.points.3.values.0: Input should be a finite number; ...'"""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", ""))
    return "; ".join(parts)
