"""The part of Prometheus' HTTP API that watches use: instant and range queries
(``/api/v1/query``, ``/api/v1/query_range``), their results as ``Series``."""

from __future__ import annotations

import httpx
import numpy as np

from service.ingest.wire import Series
from service.settings import Settings

# Prometheus refuses a range query of more than 11,000 points per series
MAX_RANGE_POINTS = 10_000


class QueryError(Exception):
    """The query itself is wrong (a 4xx of Prometheus): retrying will not help."""


class Unavailable(Exception):
    """Prometheus cannot answer now (unreachable, a timeout, a 5xx): back off, retry."""


class PrometheusAPI:
    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        assert settings.prometheus_url, "watches need TSAD_PROMETHEUS_URL"
        self.base = settings.prometheus_url.rstrip("/")
        headers = {"User-Agent": "tsad-watch"}
        if token := settings.prometheus_bearer_token:
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        self.client = client or httpx.AsyncClient(
            timeout=settings.prometheus_timeout_seconds, headers=headers)

    async def close(self) -> None:
        await self.client.aclose()

    async def query(self, query: str, at: float) -> list[Series]:
        """The query evaluated at ``at``: one point per series."""
        return await self._get("/api/v1/query", {"query": query, "time": repr(at)})

    async def query_range(self, query: str, start: float, end: float,
                          step: float) -> list[Series]:
        """The query evaluated at start, start + step, ... end (inclusive)."""
        return await self._get("/api/v1/query_range", {
            "query": query, "start": repr(start), "end": repr(end), "step": repr(step)})

    async def _get(self, path: str, params: dict) -> list[Series]:
        try:
            response = await self.client.get(self.base + path, params=params)
        except httpx.HTTPError as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise Unavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
        except ValueError:
            raise Unavailable(f"HTTP {response.status_code}: not JSON") from None
        if response.status_code >= 400 or body.get("status") != "success":
            raise QueryError(f"{body.get('errorType', response.status_code)}: "
                             f"{body.get('error', response.text[:200])}")
        return _series(body["data"])


def _series(data: dict) -> list[Series]:
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":  # [t, "v"]: one unnamed series
        result = [{"metric": {}, "value": result}]
        kind = "vector"
    if kind == "string":
        raise QueryError("the query returns a string, not numbers")
    out = []
    for item in result:
        pairs = [item["value"]] if kind == "vector" else item["values"]
        stamps = np.array([float(p[0]) for p in pairs])
        values = np.array([float(p[1]) for p in pairs])  # "NaN", "+Inf" parse as such
        out.append(Series(dict(item["metric"]), stamps, values))
    return out
