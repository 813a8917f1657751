"""The two push doors: a remote-write 1.0 request and an OTLP/HTTP metrics request, from
their bytes and headers to scored streams (``Ingestor``), with the answers their senders
expect: refusals of a whole request as domain errors (``service/errors.py``: 400 not
decodable, 413 too large, 415 not spoken, 503 retry), everything else a 2xx, samples
dropped by a policy counted in tsad_ingest_samples_total."""

from __future__ import annotations

from service.errors import StoreUnavailable, UnsupportedMedia
from service.ingest.engine import Ingestor, Report
from service.ingest.wire import (
    Decoded,
    decode_otlp,
    decode_remote_write,
    gunzip,
    otlp_response,
    otlp_series,
)

OTLP_MEDIA = ("application/x-protobuf", "application/json")


class IngestDoors:
    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self.max_bytes = ingestor.settings.max_body_bytes

    async def remote_write(self, body: bytes, *, version: str | None, encoding: str | None,
                           tenant: str | None) -> None:
        """A remote-write request (headers X-Prometheus-Remote-Write-Version and
        Content-Encoding as sent, None when absent)."""
        version = version or "0.1.0"
        if not version.startswith("0.1."):
            raise UnsupportedMedia(f"remote-write version {version!r}: this receiver "
                                   "speaks 1.0 (X-Prometheus-Remote-Write-Version 0.1.0)")
        encoding = (encoding or "snappy").lower()
        if encoding != "snappy":
            raise UnsupportedMedia(f"Content-Encoding {encoding!r}: remote-write bodies "
                                   "are snappy-compressed")
        decoded = decode_remote_write(body, self.max_bytes)
        self._settle(decoded, await self.ingestor.ingest(decoded.series, "remote_write",
                                                         tenant=tenant), "remote_write")

    async def otlp(self, body: bytes, *, media: str | None, encoding: str | None,
                   tenant: str | None) -> tuple[bytes, str]:
        """An OTLP/HTTP metrics request (Content-Type and Content-Encoding as sent); the
        ExportMetricsServiceResponse and its media type, in the request's encoding:
        partial_success counts the points not accepted, and says why."""
        media = (media or "").split(";")[0].strip().lower()
        if media not in OTLP_MEDIA:
            raise UnsupportedMedia(f"Content-Type {media!r}: OTLP/HTTP is "
                                   "application/x-protobuf or application/json")
        if (encoding or "").lower() == "gzip":
            body = gunzip(body, self.max_bytes)
        json_body = media == "application/json"
        decoded = otlp_series(decode_otlp(body, json_body))
        report = await self.ingestor.ingest(decoded.series, "otlp", tenant=tenant)
        self._settle(decoded, report, "otlp")
        problems = decoded.problems + report.problems
        if decoded.unsupported:
            problems.append(f"{decoded.unsupported} histogram or summary points: tsad "
                            "scores gauges and sums")
        problems += [f"{n} points dropped: {reason}" for reason, n in report.dropped.items()]
        rejected = decoded.invalid + decoded.unsupported + report.rejected
        return otlp_response(rejected, "; ".join(problems[:5]), json_body)

    def _settle(self, decoded: Decoded, report: Report, door: str) -> None:
        """Count what could not be decoded into points; a store outage is a 503."""
        samples = self.ingestor.metrics.ingest_samples_total
        if decoded.invalid:
            samples.labels(door, "invalid").inc(decoded.invalid)
        if decoded.unsupported:
            samples.labels(door, "unsupported").inc(decoded.unsupported)
        if report.unavailable:
            raise StoreUnavailable(report.unavailable)
