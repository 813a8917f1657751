"""Webhook signatures: HMAC-SHA256 over ``timestamp + "." + body`` with the subscription's
secret, sent as ``X-Tsad-Signature: v1=<hex>`` beside ``X-Tsad-Timestamp: <unix
seconds>``. Receivers recompute it over the raw body and reject old timestamps (replays).

>>> sig = sign("s3cret", 1700000000, b'{"a":1}')
>>> verify("s3cret", "1700000000", sig, b'{"a":1}', now=1700000010)
True
>>> verify("s3cret", "1700000000", sig, b'{"a":2}', now=1700000010)
False
>>> verify("s3cret", "1700000000", sig, b'{"a":1}', now=1700009999)  # too old
False
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Tsad-Signature"
TIMESTAMP_HEADER = "X-Tsad-Timestamp"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def verify(secret: str, timestamp: str, signature: str, body: bytes,
           tolerance_seconds: float = 300, now: float | None = None) -> bool:
    """True when the signature matches and the timestamp is within the tolerance."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)
