"""Errors the API turns into 4xx/503 answers that name the offending field."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.redaction import redact


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


def unavailable_response(exc: Exception, retry_after_seconds: int) -> JSONResponse:
    """The 503 of a store that cannot be reached, logged (its message redacted: a store's
    URL may carry its password)."""
    logging.getLogger("tsad.service").warning("store unavailable", extra={"error": str(exc)})
    return JSONResponse(
        {"message": f"window store unavailable, retry later: {redact(str(exc))}",
         "detail": None},
        status_code=503, headers={"Retry-After": str(retry_after_seconds)})
