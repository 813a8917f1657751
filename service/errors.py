"""The service's domain errors: what went wrong, and where, in the service's own terms.

Domain code (validation, the score transaction, stores, feedback, auth) raises these and
never an HTTP exception; ``service/http.py`` maps each kind to its status code in one
table. ``loc`` names the offending field as FastAPI does (``("body", "points", 3,
"timestamp")``): an error with a ``loc`` is answered with that field in ``detail``.
"""

from __future__ import annotations

from collections.abc import Sequence

Loc = tuple[str | int, ...]


class ServiceError(Exception):
    """Base class: a message for the caller, and the field it concerns (if any)."""

    def __init__(self, message: str, loc: Sequence[str | int] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.loc: Loc | None = tuple(loc) if loc is not None else None


class InvalidInput(ServiceError):
    """The request is malformed or breaks a rule of the data (422); nothing changed."""

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message, loc)


class Conflict(ServiceError):
    """The request conflicts with stored state (409); nothing changed. ``loc``: the field
    whose value conflicts (None: the request as a whole)."""

    def __init__(self, loc: Sequence[str | int] | None, message: str) -> None:
        super().__init__(message, loc)


class LimitReached(ServiceError):
    """A quota of the service is full (429), e.g. TSAD_MAX_STREAMS."""

    def __init__(self, loc: Sequence[str | int] | None, message: str) -> None:
        super().__init__(message, loc)


class Undecodable(ServiceError):
    """The body is not in the format its headers name (400): not snappy, not a
    WriteRequest, not OTLP; nothing changed. A 400, not a 422: what remote-write and
    OTLP senders expect of a body they must not send again."""


class TooLarge(ServiceError):
    """The body, or what it decompresses to, is over TSAD_MAX_BODY_BYTES (413)."""


class UnsupportedMedia(ServiceError):
    """A content type, encoding or protocol version the service does not speak (415)."""


class NotFound(ServiceError):
    """No such stream, alert, webhook, key or dead letter (404)."""


class Unauthenticated(ServiceError):
    """No key, or an unknown or revoked one (401, with a Bearer challenge)."""


class Forbidden(ServiceError):
    """The key's scope or tenant does not allow the request (403)."""


class StoreUnavailable(ServiceError):
    """The backing store cannot be reached (503); the request may be retried."""


def describe(errors: Sequence[dict]) -> str:
    """'body.points.3.values.0: Input should be a finite number; ...'

    >>> describe([{"loc": ("body", "points", 3), "msg": "bad"}, {"msg": "worse"}])
    'body.points.3: bad; worse'
    """
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", ""))
    return "; ".join(parts)
