"""Secrets out of everything the service and the `tsad` CLI render.

Credentials travel inside URLs (``REDIS_URL=redis://:PASS@host/0``, a webhook's
``https://user:pass@host/...``, ``--url http://user:pass@host``), and URLs end up in error
messages, ``/readyz``, 503 bodies, logs and CLI output. Two layers keep them out:

- at the source, ``redact_url`` wherever a URL is put into a message or an answer;
- at the exits, ``redact`` over every log line (``install_log_redaction`` wraps every
  logging handler's formatter), over error answers, and over the CLI's stdout and stderr
  (``guard_output``). ``redact`` cuts the credentials of any URL in a text, and every
  secret the process was configured with (``register_secrets``: the Redis password, the
  admin key, the client's API key), so that a secret reaching a message by another road (a
  client library quoting its connection arguments) is cut as well.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    from service.settings import Settings

MASK = "***"
# shorter registered secrets are left to the URL rules: masking every "redis" or "admin"
# in every line would garble the logs and protect little
MIN_SECRET_LENGTH = 8
# query parameters that carry credentials (redis-py reads ?password=, S3/Azure sign URLs)
_SECRET_PARAMS = ("password", "passwd", "pwd", "pass", "secret", "token", "access_token",
                  "api_key", "apikey", "key", "auth", "sig", "signature", "credential")
# scheme://userinfo@ : the userinfo runs to the last '@' before the path (a password with
# an unencoded '@' is still cut whole)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s'\"<>]*)@")
_QUERY_SECRET = re.compile(
    rf"(?P<head>[?&;](?:{'|'.join(_SECRET_PARAMS)})=)[^&;#\s'\"<>]*", re.IGNORECASE)

_secrets: list[str] = []  # longest first, so that no part of a longer one is left over


def _masked_userinfo(userinfo: str) -> str:
    """'user:pass' -> 'user:***'; a lone 'token' (GitHub-style) -> '***'."""
    user, sep, _ = userinfo.partition(":")
    return f"{user}:{MASK}" if sep else MASK


def redact_url(url: str) -> str:
    """``url`` with its password (or lone user part) and secret query values masked.

    >>> redact_url("redis://:s3cret@redis:6379/0")
    'redis://:***@redis:6379/0'
    >>> redact_url("https://alice:p@ss@hooks.example.com/x?token=abc&a=1")
    'https://alice:***@hooks.example.com/x?token=***&a=1'
    >>> redact_url("https://ghp_0123456789@example.com/")
    'https://***@example.com/'
    >>> redact_url("redis://redis:6379/0?password=s3cret")
    'redis://redis:6379/0?password=***'
    >>> redact_url("http://127.0.0.1:8000")
    'http://127.0.0.1:8000'
    """
    return _QUERY_SECRET.sub(lambda m: m["head"] + MASK, _USERINFO.sub(
        lambda m: m["head"] + _masked_userinfo(m["userinfo"]) + "@", url))


def register_secrets(values: Iterable[str | None]) -> None:
    """Secrets to cut from every text ``redact`` sees from now on (this process), in the
    forms they are rendered in: as is, percent-encoded and percent-decoded, JSON-escaped."""
    for value in values:
        if not value or len(value) < MIN_SECRET_LENGTH:
            continue
        for form in (value, unquote(value), quote(value, safe=""),
                     json.dumps(value)[1:-1]):
            if len(form) >= MIN_SECRET_LENGTH and form not in _secrets:
                _secrets.append(form)
    _secrets.sort(key=len, reverse=True)


def url_secrets(url: str | None) -> list[str]:
    """The secrets a URL carries: its password (or lone user part), secret query values.

    >>> url_secrets("redis://:s3cret-pass@redis:6379/0")
    ['s3cret-pass']
    >>> url_secrets("redis://default:pw-123456@h/0?password=other-pw")
    ['pw-123456', 'other-pw']
    """
    if not url:
        return []
    parts = urlsplit(url)
    found = []
    if parts.password:
        found.append(parts.password)
    elif parts.username:
        found.append(parts.username)
    for pair in re.split(r"[&;]", parts.query):
        name, _, value = pair.partition("=")
        if name.lower() in _SECRET_PARAMS and value:
            found.append(value)
    return found


def redact(text: str) -> str:
    """``text`` with URL credentials and every registered secret masked."""
    text = redact_url(text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


# --- the exits: log handlers and the CLI's output streams -------------------------------
class RedactingFormatter(logging.Formatter):
    """Formats with ``inner`` (whatever the handler had), then redacts the whole line:
    the message, the fields of structured logs and any traceback alike."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def install_log_redaction() -> None:
    """Wrap the formatter of every handler now configured (the root's and those of
    loggers with their own, such as uvicorn's) in a RedactingFormatter, once."""
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict
                                      .values() if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler.formatter, RedactingFormatter):
                handler.setFormatter(RedactingFormatter(handler.formatter))


class _RedactingStream:
    """A text stream whose writes are redacted (print writes a line's text in one call)."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> object:  # flush, isatty, fileno, encoding, ...
        return getattr(self._inner, name)


def settings_secrets(settings: Settings) -> list[str]:
    """The secrets a service's settings hold: the Redis password, the admin key."""
    admin = settings.admin_key.get_secret_value() if settings.admin_key else None
    return [*url_secrets(settings.redis_url), *([admin] if admin else [])]


def environment_secrets(env: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """The secrets the service's and the clients' settings carry in the environment."""
    found = [v for name in ("TSAD_ADMIN_KEY", "TSAD_API_KEY") if (v := env.get(name))]
    for name in ("TSAD_REDIS_URL", "REDIS_URL"):
        found += url_secrets(env.get(name))
    return found


def guard_output() -> None:
    """The `tsad` CLI: redact its stdout and stderr (messages, tracebacks, SystemExit
    text), with the environment's secrets registered."""
    register_secrets(environment_secrets())
    if not isinstance(sys.stdout, _RedactingStream):
        sys.stdout = _RedactingStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, _RedactingStream):
        sys.stderr = _RedactingStream(sys.stderr)  # type: ignore[assignment]
