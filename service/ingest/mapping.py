"""Series to streams: which stream and channel each Prometheus series feeds.

The default: one stream per series, one channel. Its id is the metric name followed by
the series' labels, sorted, as ``.name:value`` (``up.instance:localhost:9090.job:node``),
with characters outside the stream-id alphabet as ``_``. The id ends in ``-`` and 12 hex
digits of a SHA-256 of the full label set when it would pass 128 characters, when a
character had to be replaced, or when a value holds something that reads as a next
label (``.name:``): then two different series never share a stream.

A grouping rule (``GroupRule``) makes multichannel streams: the series it selects
(``match`` label values, ``match_re`` full-match regular expressions) are grouped by the
values of ``group_by``, and each group is one stream whose channels are the listed
``channels``, told apart by the ``channels_by`` label. ``group_by: [instance]``,
``channels_by: __name__`` scores one host's CPU, memory and network together. Its stream
id is the rule's name followed by the group's labels, rendered the same way.

A key with a tenant prefixes every id with ``<tenant>.``. Watches name their streams
after the watch (``service/ingest/watch.py``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

MAX_STREAM_ID = 128
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # rule and watch names: heads of stream ids
_OUTSIDE = re.compile(r"[^A-Za-z0-9_.:-]")
_READS_AS_LABEL = re.compile(r"\.[A-Za-z_][A-Za-z0-9_]*:")
_HASH_DIGITS = 12


def stream_id(head: str, labels: Mapping[str, str], tenant: str | None = None) -> str:
    """The stream id of ``head`` (a metric, rule or watch name) and ``labels``.

    >>> stream_id("up", {"job": "node", "instance": "localhost:9100"})
    'up.instance:localhost:9100.job:node'
    >>> stream_id("up", {"path": "/api v1"})  # replaced characters: a hash keeps it unique
    'up.path:_api_v1-c0f91a146529'
    >>> len(stream_id("x", {"a": "v" * 200})), stream_id("up", {}, tenant="acme")
    (128, 'acme.up')
    """
    items = sorted(labels.items())
    readable = head + "".join(f".{k}:{v}" for k, v in items)
    clean = _OUTSIDE.sub("_", readable)
    prefix = f"{tenant}." if tenant else ""
    exact = clean == readable and not any(_READS_AS_LABEL.search(v) for _, v in items)
    if exact and len(prefix) + len(clean) <= MAX_STREAM_ID:
        return prefix + clean
    canonical = head + "{" + ",".join(f"{k}={v!r}" for k, v in items) + "}"
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:_HASH_DIGITS]
    room = MAX_STREAM_ID - len(prefix) - 1 - _HASH_DIGITS
    return f"{prefix}{clean[:room]}-{digest}"


class GroupRule(BaseModel):
    """One grouping rule of the ``rules`` list (YAML), or a watch's grouping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="heads the ids of its streams")
    match: dict[str, str] = Field(default_factory=dict, description="label values a "
                                  "series must have (exactly)")
    match_re: dict[str, str] = Field(default_factory=dict, description="label values a "
                                     "series must fully match (regular expressions)")
    group_by: list[str] = Field(min_length=1, description="labels whose values name a "
                                "stream")
    channels_by: str = Field("__name__", description="the label that tells channels apart")
    channels: list[str] = Field(min_length=1, max_length=1024, description="the values of "
                                "channels_by, in channel order: a stream's channels, fixed")

    _index: dict[str, int] = PrivateAttr(default_factory=dict)
    _patterns: dict[str, re.Pattern] = PrivateAttr(default_factory=dict)

    def model_post_init(self, _context: object) -> None:
        self._index = {c: i for i, c in enumerate(self.channels)}
        self._patterns = {k: re.compile(p) for k, p in self.match_re.items()}

    @field_validator("match_re")
    @classmethod
    def _compiles(cls, value: dict[str, str]) -> dict[str, str]:
        for label, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"match_re.{label}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _distinct(self) -> GroupRule:
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("channels must be distinct")
        if self.channels_by in self.group_by:
            raise ValueError("channels_by cannot be one of group_by")
        return self

    def selects(self, labels: Mapping[str, str]) -> bool:
        return (labels.get(self.channels_by) in self._index
                and all(labels.get(k) == v for k, v in self.match.items())
                and all(p.fullmatch(labels.get(k, "")) for k, p in self._patterns.items()))

    def channel(self, labels: Mapping[str, str]) -> int:
        return self._index[labels[self.channels_by]]


@dataclass(frozen=True)
class Route:
    """Where one series goes: its stream, its channel there, and the labels of the
    stream's written-back score series."""

    stream: str
    channel: int
    rule: GroupRule | None  # None: the stream is this series alone
    labels: dict[str, str] = field(hash=False)  # without __name__; with stream and for


def route(labels: Mapping[str, str], rules: Sequence[GroupRule], *,
          head: str | None = None, tenant: str | None = None) -> Route:
    """The stream of a series: the first rule that selects it (its streams are named
    after the rule), else a stream of its own, named after ``head`` (a watch's name) and
    the metric. Labels ``stream`` and ``for`` (the metric, rule or watch the score is
    for) of the score series are tsad's: they replace source labels of those names.

    >>> r = GroupRule(name="host", group_by=["instance"], channels=["cpu", "mem"])
    >>> to = route({"__name__": "mem", "instance": "a", "job": "n"}, [r])
    >>> to.stream, to.channel, to.labels
    ('host.instance:a', 1, {'instance': 'a', 'stream': 'host.instance:a', 'for': 'host'})
    >>> route({"__name__": "up", "job": "n"}, [r], head="w").stream
    'w.up.job:n'
    """
    for rule in rules:
        if rule.selects(labels):
            group = {k: labels[k] for k in rule.group_by if labels.get(k)}
            sid = stream_id(rule.name, group, tenant)
            return Route(sid, rule.channel(labels), rule,
                         {**group, "stream": sid, "for": rule.name})
    name = labels.get("__name__")
    rest = {k: v for k, v in labels.items() if k != "__name__"}
    first = ".".join(x for x in (head, name) if x) or "value"
    sid = stream_id(first, rest, tenant)
    return Route(sid, 0, None, {**rest, "stream": sid, "for": head or name or "value"})
