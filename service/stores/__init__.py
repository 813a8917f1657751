"""Storage: one declared interface (``base.Backend``) and its backends, one package each
(``memory``, ``redis``: a single Redis or a Redis Cluster). ``build_backend`` is the one
place that picks and configures a backend from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.stores.base import Backend, StreamPolicy

if TYPE_CHECKING:
    from service.settings import Settings


def stream_policy(settings: Settings) -> StreamPolicy:
    """What every append of this service applies (``StreamPolicy``)."""
    return StreamPolicy(
        window=settings.default_window, detector=settings.default_detector,
        timestamps=settings.timestamps, duplicates=settings.duplicates,
        max_back_seconds=settings.timestamp_max_back_seconds,
        unscored_max_points=settings.unscored_max_points,
        ttl_seconds=settings.stream_ttl_seconds,
        receipt_ttl_seconds=settings.idempotency_ttl_seconds)


def build_backend(settings: Settings) -> Backend:
    """Redis when ``redis_url`` is set (a cluster with ``redis_cluster``), else in process."""
    policy = stream_policy(settings)
    if settings.redis_url:
        from service.stores.redis import RedisBackend

        return RedisBackend(
            settings.redis_url, policy, prefix=settings.redis_prefix,
            cluster=settings.redis_cluster, timeout_seconds=settings.redis_timeout_seconds,
            max_connections=settings.redis_max_connections,
            lock_lease_seconds=settings.lock_lease_seconds,
            lock_wait_seconds=settings.lock_wait_seconds,
            alert_retention_seconds=settings.alert_retention_seconds,
            dead_letter_retention_seconds=settings.webhook_dead_letter_retention_seconds)
    from service.stores.memory import MemoryBackend

    return MemoryBackend(
        policy, alert_retention_seconds=settings.alert_retention_seconds,
        dead_letter_retention_seconds=settings.webhook_dead_letter_retention_seconds)


__all__ = ["Backend", "StreamPolicy", "build_backend", "stream_policy"]
