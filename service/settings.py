"""One settings object, read from the environment (prefix TSAD_) and validated at start-up."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Settings that were detector tunables, and the config field each became (the service
# refuses to start with one set, naming its replacement in TSAD_DETECTOR_PARAMS)
MOVED = {"TSAD_WARMUP_POINTS": "warmup", "TSAD_MEMORY_SIZE": "memory_size",
         "TSAD_MEMORY_ADMIT_QUANTILE": "admit_quantile", "TSAD_RESIDUAL_MAX_LAGS": "max_lags"}


class Settings(BaseSettings):
    """Every knob of the service. ``PORT`` and ``REDIS_URL`` are also read unprefixed."""

    # populate_by_name: Settings(metrics_streams=...) works beside the environment aliases
    model_config = SettingsConfigDict(env_prefix="TSAD_", extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", description="bind address of `tsad serve`; any but "
                      "loopback needs auth=keys (or allow_open)")
    port: int = Field(8000, ge=1, le=65535, validation_alias=AliasChoices("TSAD_PORT", "PORT"))
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("TSAD_REDIS_URL", "REDIS_URL"),
        description="redis://host:port/db; unset = embedded in-memory store (one process)",
    )
    redis_cluster: bool = Field(
        False, description="redis_url names a node of a Redis Cluster: the client finds the "
        "others and follows the cluster's slots (every key of a stream in one slot; alerts "
        "and webhooks share another)")
    redis_prefix: str = Field("tsad", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    redis_timeout_seconds: float = Field(2.0, gt=0)
    redis_max_connections: int = Field(
        128, ge=1, description="connections to a single Redis per process; past them a "
        "command waits for a free one (up to lock_wait_seconds) instead of failing")
    stream_ttl_seconds: int = Field(0, ge=0, description="expire idle streams; 0 = never")

    default_window: int = Field(64, ge=4, le=65_536)
    default_detector: str = "ensemble"
    artifacts_dir: Path = Field(Path("models/pretrained"), description="fitted detector "
                                "artifacts, served to streams as detector 'artifact:<name>'")
    max_batch_points: int = Field(10_000, ge=1)
    max_channels: int = Field(1024, ge=1, description="values per point (/score) and "
                              "channels per stream (PUT /streams)")
    # --- limits that keep one process alive under hostile or mistaken input ----------
    max_body_bytes: int = Field(
        16 * 2**20, ge=1024, description="request body size; larger is a 413, refused "
        "from Content-Length or as soon as the streamed bytes pass it")
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="a request body must arrive within this long of its "
        "headers, else 408 (uvicorn has no body read timeout)")
    keep_alive_seconds: int = Field(5, ge=1, description="idle keep-alive connections "
                                    "close after this long (uvicorn timeout_keep_alive)")
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="a request's line and headers must arrive within this "
        "long of its first byte (or of the connection opening), else 408 and the "
        "connection closes (uvicorn has no header timeout; service/connections.py)")
    max_header_bytes: int = Field(
        65_536, ge=1024, description="request line and headers; larger is a 431 and the "
        "connection closes (httptools has no limit)")
    max_window: int = Field(4096, ge=4, le=65_536, description="points per window a "
                            "stream may ask for")
    max_streams: int = Field(10_000, ge=0, description="streams per store; creating one "
                             "more is a 429 (0 = no limit)")
    max_streams_per_tenant: int = Field(
        0, ge=0, description="streams of one tenant (ids '<tenant>.*') that its keys may "
        "create; one more is a 429, so one tenant cannot fill TSAD_MAX_STREAMS for the "
        "others (0 = no limit but the store's; keys without tenant: the store's only)")
    duplicates: Literal["reject", "drop"] = Field(
        "reject",
        description="a batch that resends stored points (a retry) and goes on with new "
        "ones: reject = 422, drop = answer the resent ones status duplicate and store the "
        "new; a batch of resent points only is answered under both, never a 422",
    )
    timestamps: Literal["nudge", "drop", "reject"] = Field(
        "nudge",
        description="default policy for a point whose timestamp is not after the previous "
        "point's (real telemetry repeats and reorders stamps): nudge = store and score it "
        "1 ms after the previous one, drop = skip it, reject = 422 (a stream may override)",
    )
    timestamp_max_back_seconds: float = Field(
        86_400.0, gt=0, description="a point further than this behind its previous one is "
        "refused (422) whatever the timestamp policy: a daylight-saving hour or a clock "
        "fix is nudged, a series sent again is not appended as new points")
    timestamp_max_lead_seconds: float = Field(
        86400.0, gt=0, description="422 for a timestamp further than this ahead of the "
        "server clock (one such point would otherwise bar every later one)")
    timestamp_min: float = Field(0.0, description="422 for a timestamp before this (epoch "
                                 "seconds; 0 = 1970-01-01)")
    value_max_abs: float = Field(
        1e15, gt=0, le=1e300, description="422 for a value of larger magnitude: the "
        "detectors square and sum values, and a 1e308 would overflow to inf and wreck a "
        "stream's threshold for good (1e15 keeps integers exact in float64)")
    detector_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="overrides of detector tunables for the streams "
        "this service creates, as JSON: a registered detector name, or \"*\" for every "
        "detector that has the field, to its config fields, e.g. '{\"*\": {\"warmup\": "
        "512}, \"embedding_memory\": {\"memory_size\": 1024}}'; the defaults are each "
        "detector's Config (models/README.md). Unknown names, fields and ill-typed values "
        "stop the service at start-up")
    costly_score_stride: int = Field(
        4, ge=1, description="language-model detectors score every Nth point; the points in "
        "between repeat the last verdict (CPU inference is the bottleneck)")
    lm_batch_window_ms: float = Field(
        2.0, ge=0, le=1000, description="language-model detectors: concurrent requests' "
        "prompts share one forward pass; a pass waits this long after the first call for "
        "others to join (while a pass runs, calls queue for the next one anyway)")
    blas_threads: int = Field(
        1, ge=1, le=256, description="BLAS threads per process for numpy work (requests "
        "already run in parallel; more threads oversubscribe the cores)")
    likelihood_history: int = Field(
        2000, ge=10, le=100_000, description="scores of the stream's recent past that each "
        "score's likelihood (the [0, 1] field of every result) is measured against")
    likelihood_min_scores: int = Field(
        64, ge=1, description="scores a stream needs before its likelihood is reported")
    threshold_kind: Literal["spot", "dspot", "quantile"] = Field(
        "spot", description="default per-stream threshold (SPOT/DSPOT: streaming "
        "peaks-over-threshold; quantile: a quantile of recent scores)")
    threshold_q: float = Field(1e-3, gt=0, lt=0.5,
                               description="SPOT/DSPOT risk: P(normal score > threshold)")
    threshold_alert_budget_per_day: float | None = Field(
        None, gt=0, description="default alert budget; replaces threshold_q when set")
    threshold_level: float = Field(0.98, gt=0.5, lt=1.0,
                                   description="SPOT: calibration quantile that sets t")
    threshold_calibration_points: int = Field(1000, ge=20, description="SPOT: scores "
                                              "before the tail fit")
    threshold_depth: int = Field(50, ge=2, le=10_000, description="DSPOT moving average")
    threshold_max_peaks: int = Field(500, ge=20, le=100_000, description="SPOT: peaks kept")
    threshold_quantile: float = Field(0.995, gt=0.5, lt=1.0)
    threshold_history: int = Field(2000, ge=10)
    threshold_min_scores: int = Field(100, ge=1)
    # TSAD_THRESHOLD_METRIC_* are the names these had when only the threshold was exported
    metrics_streams: str = Field(
        "", validation_alias=AliasChoices("TSAD_METRICS_STREAMS",
                                          "TSAD_THRESHOLD_METRIC_STREAMS"),
        description="comma-separated stream globs that get per-stream series "
        "(tsad_stream_score, tsad_stream_threshold, ...); empty = none")
    metrics_max_streams: int = Field(
        100, ge=0, validation_alias=AliasChoices("TSAD_METRICS_MAX_STREAMS",
                                                 "TSAD_THRESHOLD_METRIC_MAX_STREAMS"),
        description="cap on streams with per-stream series (first come, first served)")

    alert_k: int = Field(1, ge=1, description="open when k of the last m points are anomalous")
    alert_m: int = Field(1, ge=1, le=1000)
    alert_critical_ratio: float = Field(
        2.0, gt=1.0, description="score / threshold at which a point is critical; a "
        "critical point opens an alert by itself")
    alert_quiet_points: int = Field(12, ge=0, description="resolve after this many normal "
                                    "points in a row (0 = use seconds only)")
    alert_quiet_seconds: float = Field(0.0, ge=0, description="resolve after this long "
                                       "(stream time) without anomalies (0 = points only)")
    alert_cooldown_seconds: float = Field(
        3600.0, ge=0, description="an incident within this long (stream time) after an "
        "alert resolved reopens it instead of opening a new one")
    alert_retention_seconds: int = Field(30 * 86400, ge=60,
                                         description="keep resolved alerts this long")
    alert_prompt_strategy: Literal["variance", "trend", "autocorr", "all"] = "all"

    webhook_max_attempts: int = Field(200, ge=1, le=10_000, description="then "
                                      "dead-lettered")
    webhook_backoff_seconds: float = Field(2.0, gt=0, description="first retry delay; "
                                           "doubles each attempt, full jitter")
    webhook_backoff_max_seconds: float = Field(3600.0, gt=0)
    webhook_retry_horizon_seconds: float = Field(
        3 * 86400, gt=0, description="a delivery whose next retry would come this long "
        "after its event is dead-lettered instead (like Stripe's three days)")
    webhook_dead_letter_retention_seconds: int = Field(
        30 * 86400, ge=60, description="dead letters are deleted this long after they died")
    webhook_timeout_seconds: float = Field(5.0, gt=0, description="per request")
    webhook_poll_seconds: float = Field(0.5, gt=0, description="worker idle poll interval")
    webhook_concurrency: int = Field(8, ge=1, le=256)
    webhook_lease_seconds: float = Field(
        60.0, gt=0, description="a claimed delivery not acknowledged within this long (a "
        "crashed worker) is delivered again")
    top_channels: int = Field(3, ge=1, description="channels explained per anomalous point")
    precedents: int = Field(
        3, ge=0, le=20, description="memory detectors: nearest normal precedent windows "
        "returned per top channel of an anomalous point and put in alerts (0 = off)")

    feedback_max_ranges: int = Field(
        32, ge=1, le=1000, description="labelled ranges kept per stream (the oldest are "
        "dropped with their windows); also the most one request may send")
    feedback_windows_per_range: int = Field(
        8, ge=1, le=256, description="labelled windows kept per range, evenly spread over it")
    feedback_steps: int = Field(20, ge=1, description="default optimiser steps of an "
                                "adaptation (a request may ask for up to feedback_max_steps)")
    feedback_max_steps: int = Field(200, ge=1, le=10_000)
    feedback_lr: float = Field(1e-2, gt=0, le=1.0, description="AdamW learning rate of an "
                               "adaptation (linear decay to 0)")
    feedback_max_seconds: float = Field(
        10.0, gt=0, le=600, description="an adaptation stops after this long, whatever its "
        "steps (it runs in a worker thread, outside the stream's lock)")

    # --- shadow detectors (README, "Shadow detectors"; service/shadows) ----------------
    shadows_max_per_stream: int = Field(
        3, ge=0, le=16, description="shadow detectors a stream may run beside its live one "
        "(PUT /streams/{id}/shadows/{name}; one more is a 429; 0 = shadows off)")
    shadows_allow_costly: bool = Field(
        False, description="allow shadows whose detector runs a language model or torch "
        "per window (embedding_memory, CMA, SPEAR, SSM x LLM, fusions of them); like "
        "every shadow they are scored on the background queue, off the request path")
    shadow_log_points: int = Field(
        20_000, ge=64, le=1_000_000, description="per-point comparison (both scores and "
        "verdicts) kept per shadow, newest first: what the report's rank correlation, "
        "precision and recall cover (about 22 bytes a point)")
    shadow_queue_points: int = Field(
        100_000, ge=64, description="points waiting for shadows on one process's background "
        "queue (all streams); beyond it a shadow's oldest waiting points are dropped and "
        "counted as skipped, so a lagging shadow never holds back /score or memory")
    shadow_catch_up_points: int = Field(
        512, ge=64, le=100_000, description="a cheap shadow catches up once this many of "
        "its points wait (and a chunk end is among them), or once its oldest has waited "
        "shadow_catch_up_seconds: each catch-up's fixed cost (its mark read, its state "
        "encoded and committed under the stream's lock) is spread over that many points")
    shadow_catch_up_seconds: float = Field(
        1.0, ge=0, le=3600, description="the longest a cheap shadow's waiting point waits "
        "for the next catch-up (0: at every chunk end, as costly shadows)")
    shadow_workers: int = Field(1, ge=1, le=16, description="background tasks scoring "
                                "shadows per process (cheap shadows' jobs first)")
    shadow_costly_together: int = Field(
        16, ge=1, le=256, description="ready jobs of costly shadows (of any streams) a "
        "background task scores together: their language-model prompts share forward passes")

    # --- security: API keys and webhook destinations (README, "Security") ---------------
    auth: Literal["keys", "open"] = Field(
        "open", description="keys: every request but /healthz, /readyz (and /metrics "
        "unless metrics_auth) needs an API key; open: no check (loopback only, see "
        "allow_open)")
    allow_open: bool = Field(False, description="let auth=open bind a non-loopback address")
    admin_key: SecretStr | None = Field(
        None, min_length=32, description="bootstrap admin key (scopes: all, no tenant), "
        "compared by hash, never stored; more keys: `tsad keys create` or POST /keys")
    metrics_auth: bool = Field(False, description="auth=keys: /metrics needs a 'read' key "
                               "without tenant (Prometheus: an authorization credential)")
    webhook_allow_hosts: str = Field(
        "", description="comma-separated host names and IP networks (CIDR) webhooks may "
        "reach although private, loopback, link-local or reserved; e.g. "
        "'receiver,10.1.0.0/16'")

    # --- Prometheus-native ingest and write-back (service/ingest/, issue 26) -------------
    ingest_config: Path | None = Field(
        None, description="YAML file with `rules` (series to multichannel streams: match, "
        "group_by, channels_by, channels) and `watches` (PromQL queries polled by tsad); "
        "configs/prometheus/tsad-ingest.example.yml")
    ingest_key: SecretStr | None = Field(
        None, min_length=32, description="bootstrap key with the ingest scope only (no "
        "tenant), compared by hash: what Prometheus' remote_write sends when nobody made "
        "it a key (the compose stack)")
    ingest_concurrency: int = Field(
        8, ge=1, le=256, description="streams of one remote-write or OTLP request scored "
        "at once")
    ingest_flush_after_seconds: float = Field(
        300.0, gt=0, description="grouped streams: a row still missing a channel this long "
        "(sample time) behind the stream's newest sample is stored with the channel's last "
        "value (PromQL's look-back does the same)")
    writeback_url: str | None = Field(
        None, description="remote-write endpoint that gets tsad_anomaly_score, "
        "tsad_anomaly_likelihood and tsad_anomaly of ingested streams, e.g. "
        "http://prometheus:9090/api/v1/write (--web.enable-remote-write-receiver); unset = "
        "no write-back")
    writeback_bearer_token: SecretStr | None = Field(None, description="sent as "
                                                     "Authorization: Bearer to writeback_url")
    writeback_batch_points: int = Field(
        2000, ge=1, le=100_000, description="scored points per write-back request (3 "
        "samples each)")
    writeback_flush_seconds: float = Field(
        1.0, gt=0, le=60, description="a partial batch is sent after this long")
    writeback_max_points: int = Field(
        100_000, ge=100, description="scored points held while the target is down, the "
        "batch in flight included; beyond, the oldest are dropped "
        "(tsad_writeback_points_dropped_total)")
    writeback_timeout_seconds: float = Field(10.0, gt=0, description="per request")
    writeback_backoff_seconds: float = Field(0.5, gt=0, description="first retry delay; "
                                             "doubles each attempt, full jitter")
    writeback_backoff_max_seconds: float = Field(30.0, gt=0)
    prometheus_url: str | None = Field(
        None, description="Prometheus HTTP API that watches query, e.g. "
        "http://prometheus:9090; unset = no watches")
    prometheus_bearer_token: SecretStr | None = Field(None, description="sent as "
                                                      "Authorization: Bearer to prometheus_url")
    prometheus_timeout_seconds: float = Field(30.0, gt=0, description="per query")
    watch_max: int = Field(100, ge=0, le=10_000, description="watches per service")
    watch_delay_seconds: float = Field(
        5.0, ge=0, le=3600, description="default per watch: time t is evaluated at t + "
        "this, so that samples scraped just before t have arrived")
    watch_backfill_seconds: float = Field(
        3600.0, ge=0, description="default per watch: how far back a new watch starts "
        "(query_range), 0 = from now")
    watch_backoff_max_seconds: float = Field(
        300.0, gt=0, description="a watch whose Prometheus fails retries after 1 s, "
        "doubling up to this")
    # --- end of issue 26 settings -------------------------------------------------------

    lock_wait_seconds: float = Field(10.0, gt=0)
    # --- crash consistency (service/README.md, "Durability") ----------------------------
    lock_lease_seconds: float = Field(
        5.0, ge=0.5, le=300, description="Redis: a stream's lock is a lease its holder "
        "renews every third of this while it works; a crashed holder's lock lapses within "
        "this long")
    unscored_max_points: int = Field(
        10_000, ge=0, description="points a crash left stored but unscored (between the "
        "append and the commit) that a stream holds to score on its next request or at "
        "start-up; older ones are skipped, logged and counted (tsad_points_unscored_total)")
    idempotency_ttl_seconds: int = Field(
        86_400, ge=60, description="how long the response of a POST /score sent with an "
        "Idempotency-Key is kept: a retry with the key gets it again")
    recover_on_start: bool = Field(
        True, description="at start-up, score in the background what a crash left "
        "unscored on every stream (one stream at a time), so their alerts are raised "
        "without waiting for more traffic")
    scorer_cache_mb: int = Field(
        256, ge=0, description="stream scorers each process keeps decoded between requests "
        "(least recently used out; counted by state size): a request whose stream nobody "
        "else wrote since skips reading and decoding its state; 0 = off")
    scorer_cache_check_seconds: float = Field(
        10.0, gt=0, description="how often each process checks its cached scorers against "
        "the store (one round trip per 1,000 cached streams): those of streams deleted "
        "(through any replica) or written by another replica since are evicted")
    fault_crash_after_append: int = Field(
        0, ge=0, description="TESTS ONLY: the process exits at once (os._exit) right after "
        "its Nth append that stored points, before scoring them; 0 = off")
    fault_kill_in_promotion: Literal["", "before-commit", "after-commit"] = Field(
        "", description="TESTS ONLY: the process SIGKILLs itself in a shadow promotion, just "
        "before or just after its commit; empty = off")
    retry_after_seconds: int = Field(5, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool | None = Field(
        None, description="true: JSON lines; false: readable lines; unset: JSON unless "
        "stderr is a terminal")

    @field_validator("default_detector")
    @classmethod
    def _known_detector(cls, name: str) -> str:
        from models.detectors import REGISTRY

        if name not in REGISTRY:
            raise ValueError(f"unknown detector {name!r}; known: {sorted(REGISTRY)}")
        return name

    @field_validator("detector_params")
    @classmethod
    def _detector_params(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from models.detectors import check_params

        for name, params in value.items():
            if "window" in params:  # the stream's: TSAD_DEFAULT_WINDOW or PUT /streams
                raise ValueError(f"{name}.window: a stream's window is not a detector "
                                 "parameter (TSAD_DEFAULT_WINDOW, or the stream's own)")
            check_params(name, params)
        return value

    @field_validator("admin_key", "ingest_key", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: object) -> object:
        return None if value == "" else value  # compose passes TSAD_ADMIN_KEY= when unset

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _allow_list(cls, value: str) -> str:
        from service.webhooks.destinations import AllowList

        AllowList.parse(value)  # raises ValueError naming the bad entry
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        for old, field in MOVED.items():  # refused, not ignored: it would silently change
            if old in os.environ:
                value = json.loads(os.environ[old]) if os.environ[old] else None
                value = None if field == "admit_quantile" and value == 0 else value
                raise ValueError(f"{old} was removed: detector tunables are the detectors' "
                                 "own (models/README.md); set TSAD_DETECTOR_PARAMS="
                                 f"'{json.dumps({'*': {field: value}})}' instead")
        if self.likelihood_min_scores > self.likelihood_history:
            raise ValueError("likelihood_min_scores must not exceed likelihood_history")
        if self.threshold_min_scores > self.threshold_history:
            raise ValueError("threshold_min_scores must not exceed threshold_history")
        if self.alert_k > self.alert_m:
            raise ValueError("alert_k must not exceed alert_m")
        if self.alert_quiet_points == 0 and self.alert_quiet_seconds == 0:
            raise ValueError("alert_quiet_points and alert_quiet_seconds cannot both be 0")
        if self.feedback_steps > self.feedback_max_steps:
            raise ValueError("feedback_steps must not exceed feedback_max_steps")
        if self.default_window > self.max_window:
            raise ValueError("default_window must not exceed max_window")
        if self.webhook_lease_seconds <= self.webhook_timeout_seconds:
            raise ValueError("webhook_lease_seconds must exceed webhook_timeout_seconds")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
