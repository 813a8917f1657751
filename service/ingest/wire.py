"""The two wire formats in and one out: Prometheus remote-write 1.0 (snappy-compressed
protobuf ``WriteRequest``, decoded and encoded), and OTLP/HTTP metrics (protobuf or JSON,
optionally gzip), decoded. Both become ``Series``: a label set in Prometheus' model
(``__name__`` plus labels) and its samples, which ``service/ingest/mapping.py`` turns
into streams.

Snappy is cramjam's (the block format remote-write uses, not the framed one); the
protobuf messages are upstream's: ``service/ingest/prompb`` (vendored Prometheus protos)
and ``opentelemetry-proto`` (the OpenTelemetry project's own package).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cramjam
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.metrics.v1 import metrics_pb2

from service.errors import TooLarge, Undecodable
from service.ingest.prompb import remote_pb2

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# Prometheus' staleness marker: a NaN with this exact bit pattern ends a series
STALE_NAN_BITS = 0x7FF0000000000002
REMOTE_WRITE_HEADERS = {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
                        "X-Prometheus-Remote-Write-Version": "0.1.0"}


@dataclass
class Series:
    labels: dict[str, str]  # __name__ and the labels, Prometheus' data model
    timestamps: np.ndarray  # epoch seconds, float64
    values: np.ndarray  # float64; NaN for a stale marker or a point without a value
    stale: np.ndarray = field(default=None)  # bool: which NaNs are end-of-series markers

    def __post_init__(self) -> None:
        if self.stale is None:
            self.stale = np.zeros(len(self.values), dtype=bool)


@dataclass
class Decoded:
    series: list[Series]
    invalid: int = 0  # samples of series whose labels break the data model
    unsupported: int = 0  # histograms, summaries: points tsad does not score
    problems: list[str] = field(default_factory=list)  # the first few, for logs and OTLP


def _bounded(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise TooLarge(f"{what} decodes to {size} bytes, more than {limit} "
                       "(TSAD_MAX_BODY_BYTES)")


# --- remote-write ------------------------------------------------------------------------
def decode_remote_write(body: bytes, max_bytes: int) -> Decoded:
    """A remote-write 1.0 body -> Series. Series with invalid labels (no metric name, a
    bad or repeated label name) are skipped and counted, not fatal: the others are data."""
    try:
        size = cramjam.snappy.decompress_raw_len(body)
    except Exception as exc:  # cramjam raises its own DecompressionError
        raise Undecodable(f"body is not snappy (block format) compressed: {exc}") from None
    _bounded(size, max_bytes, "the snappy body")
    try:
        raw = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:
        raise Undecodable(f"body is not snappy (block format) compressed: {exc}") from None
    request = remote_pb2.WriteRequest()
    try:
        request.ParseFromString(raw)
    except DecodeError as exc:
        raise Undecodable(f"body is not a protobuf prometheus.WriteRequest: {exc}") from None
    out = Decoded([])
    for i, ts in enumerate(request.timeseries):
        labels: dict[str, str] = {}
        problem = None
        for label in ts.labels:
            if label.name in labels:
                problem = f"label {label.name!r} repeated"
            elif not LABEL_NAME.match(label.name):
                problem = f"invalid label name {label.name!r}"
            if label.value:  # an empty value is the same as no label
                labels[label.name] = label.value
        if problem is None and not METRIC_NAME.match(labels.get("__name__", "")):
            problem = f"metric name {labels.get('__name__')!r} missing or invalid"
        out.unsupported += len(ts.histograms)
        if problem is not None:
            out.invalid += len(ts.samples)
            if len(out.problems) < 3:
                out.problems.append(f"timeseries[{i}]: {problem}")
            continue
        if not len(ts.samples):
            continue
        stamps = np.fromiter((s.timestamp for s in ts.samples), np.int64, len(ts.samples))
        values = np.fromiter((s.value for s in ts.samples), np.float64, len(ts.samples))
        stale = values.view(np.uint64) == STALE_NAN_BITS
        out.series.append(Series(labels, stamps / 1000.0, values, stale))
    return out


def encode_remote_write(series: Iterable[tuple[Sequence[tuple[str, str]],
                                               Sequence[tuple[int, float]]]]) -> bytes:
    """(sorted labels with __name__, [(timestamp ms, value)]) per series -> a snappy
    remote-write 1.0 body."""
    request = remote_pb2.WriteRequest()
    for labels, samples in series:
        ts = request.timeseries.add()
        for name, value in labels:
            ts.labels.add(name=name, value=value)
        for stamp, value in samples:
            ts.samples.add(timestamp=stamp, value=value)
    return bytes(cramjam.snappy.compress_raw(request.SerializeToString()))


# --- OTLP/HTTP metrics ---------------------------------------------------------------------
def gunzip(body: bytes, max_bytes: int) -> bytes:
    """A gzip body, inflated no further than ``max_bytes`` (a zip bomb is a 413)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise Undecodable(f"body is not gzip: {exc}") from None
    _bounded(len(out), max_bytes, "the gzip body")
    return out


def decode_otlp(body: bytes, json_body: bool) -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    if not json_body:
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise Undecodable("body is not a protobuf ExportMetricsServiceRequest: "
                            f"{exc}") from None
        return request
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Undecodable(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Undecodable("body is not a JSON object (ExportMetricsServiceRequest)")
    for key in ("resourceMetrics", "resource_metrics"):
        if key in doc and not isinstance(doc[key], list):
            raise Undecodable(f"{key} must be an array")
    # OTLP/JSON writes trace and span ids in hex where protobuf's JSON mapping expects
    # base64; exemplars are all that carry them, and tsad does not use exemplars
    _drop_key(doc, "exemplars")
    try:
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise Undecodable(f"body is not an OTLP JSON ExportMetricsServiceRequest: {exc}") from None
    return request


def _drop_key(node: object, key: str) -> None:
    if isinstance(node, dict):
        node.pop(key, None)
        for value in node.values():
            _drop_key(value, key)
    elif isinstance(node, list):
        for value in node:
            _drop_key(value, key)


def otlp_series(request: ExportMetricsServiceRequest) -> Decoded:
    """Gauges and sums -> Series, named as Prometheus' OpenTelemetry compatibility names
    them: the metric name with characters outside [a-zA-Z0-9_:] as _, ``_total`` after a
    monotonic cumulative sum; data point attributes as labels (names likewise), the
    resource's service.name (after service.namespace/) as ``job`` and service.instance.id
    as ``instance``. Histograms and summaries are counted as unsupported."""
    by_labels: dict[tuple, tuple[list[float], list[float], list[bool]]] = {}
    out = Decoded([])
    cumulative = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    for rm in request.resource_metrics:
        resource = _resource_labels(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind not in ("gauge", "sum"):
                    out.unsupported += _count_points(metric, kind)
                    continue
                data = getattr(metric, kind)
                name = prometheus_name(metric.name)
                if (kind == "sum" and data.is_monotonic and data.aggregation_temporality
                        == cumulative and not name.endswith("_total")):
                    name += "_total"
                if not name:
                    out.invalid += len(data.data_points)
                    out.problems.append("a metric without a name")
                    continue
                for p in data.data_points:
                    labels = {**resource, **{prometheus_name(kv.key, label=True):
                                             _attribute(kv.value) for kv in p.attributes},
                              "__name__": name}
                    labels = {k: v for k, v in labels.items() if v}
                    no_value = bool(p.flags & 1)  # DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
                    value = (float("nan") if no_value else
                             float(p.as_int) if p.WhichOneof("value") == "as_int" else
                             p.as_double)
                    if not p.time_unix_nano:
                        out.invalid += 1
                        if len(out.problems) < 3:
                            out.problems.append(f"{metric.name}: a point without "
                                                "time_unix_nano")
                        continue
                    key = tuple(sorted(labels.items()))
                    stamps, values, stale = by_labels.setdefault(key, ([], [], []))
                    stamps.append(p.time_unix_nano / 1e9)
                    values.append(value)
                    stale.append(no_value)
    for key, (stamps, values, stale) in by_labels.items():
        order = np.argsort(stamps, kind="stable")
        out.series.append(Series(dict(key), np.asarray(stamps)[order],
                                 np.asarray(values, dtype=np.float64)[order],
                                 np.asarray(stale, dtype=bool)[order]))
    return out


def otlp_response(rejected: int, message: str, json_body: bool) -> tuple[bytes, str]:
    """The ExportMetricsServiceResponse body and its content type; partial_success says
    how many points were not accepted and why."""
    response = ExportMetricsServiceResponse()
    if rejected:
        response.partial_success.rejected_data_points = rejected
        response.partial_success.error_message = message
    if json_body:
        return (json.dumps(json_format.MessageToDict(response)).encode(),
                "application/json")
    return response.SerializeToString(), "application/x-protobuf"


def prometheus_name(name: str, label: bool = False) -> str:
    """An OpenTelemetry name as a Prometheus metric (or label) name.

    >>> prometheus_name("http.server.duration"), prometheus_name("2xx"), prometheus_name(
    ...     "service.name", label=True)
    ('http_server_duration', '_2xx', 'service_name')
    """
    out = re.sub(r"[^a-zA-Z0-9_]" if label else r"[^a-zA-Z0-9_:]", "_", name)
    return f"_{out}" if out[:1].isdigit() else out


def _resource_labels(attributes: Iterable) -> dict[str, str]:
    attrs = {kv.key: _attribute(kv.value) for kv in attributes}
    labels = {}
    if service := attrs.get("service.name"):
        namespace = attrs.get("service.namespace")
        labels["job"] = f"{namespace}/{service}" if namespace else service
    if instance := attrs.get("service.instance.id"):
        labels["instance"] = instance
    return labels


def _attribute(value: object) -> str:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    if kind is None:
        return ""
    if kind in ("array_value", "kvlist_value", "bytes_value"):
        return json.dumps(json_format.MessageToDict(value), sort_keys=True)  # type: ignore
    raw = getattr(value, kind)
    return ("true" if raw else "false") if kind == "bool_value" else str(raw)


def _count_points(metric: object, kind: str | None) -> int:
    return len(getattr(metric, kind).data_points) if kind else 0

