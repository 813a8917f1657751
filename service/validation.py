"""Input validation beyond the schema: every check pydantic cannot express, each failure an
InvalidInput naming the field, before anything is stored.

``score_points`` turns a /score body (a list of points or columns) into an array;
``check_points`` is what every ingest path runs on its points (sizes and the bounds that
keep one point from bricking a stream); ``stream_meta`` checks a stream's configuration;
``check_feedback`` and ``inline_points`` a feedback request.
"""

from __future__ import annotations

import time

import numpy as np

from models.detectors import REGISTRY, check_params
from models.detectors.base import Online
from service.artifacts import Artifact
from service.errors import InvalidInput, Loc
from service.feedback.schemas import FeedbackRequest
from service.schemas import (
    Point,
    ScoreRequest,
    StreamConfigIn,
    columnar_loc,
    epoch,
)
from service.scoring import stream_detector
from service.settings import Settings
from service.stores.base import StreamMeta

POINTS: Loc = ("body", "points")


# --- points ------------------------------------------------------------------------------
def score_points(req: ScoreRequest, settings: Settings) -> np.ndarray:
    """A /score body as (N, 1 + C) float64, timestamp first. Order is the store's to judge
    (against the stream's last point, atomically); bounds are ``check_points``'s."""
    if req.points is None or req.timestamps is not None or req.values is not None:
        return _columns(req, settings)
    if len(req.points) > settings.max_batch_points:
        raise InvalidInput(POINTS, f"at most {settings.max_batch_points} points per "
                           f"request, got {len(req.points)}")
    channels = len(req.points[0].values)
    if channels > settings.max_channels:
        raise InvalidInput((*POINTS, 0, "values"),
                           f"at most {settings.max_channels} channels, got {channels}")
    out = np.empty((len(req.points), 1 + channels))
    for i, p in enumerate(req.points):
        if len(p.values) != channels:
            raise InvalidInput((*POINTS, i, "values"), f"expected {channels} values like "
                               f"points[0], got {len(p.values)}")
        out[i, 0] = p.epoch()
        out[i, 1:] = p.values
    return out


def _columns(req: ScoreRequest, settings: Settings) -> np.ndarray:
    """The columnar form: the same checks as points, whole arrays at a time, each error
    naming timestamps.i or values.i[.j]."""
    if req.points is not None:
        raise InvalidInput(POINTS, "give either points or timestamps and values (the "
                           "columnar form), not both")
    ts, values = req.timestamps, req.values
    if ts is None or values is None:
        missing = ("points" if ts is None and values is None else
                   "values" if values is None else "timestamps")
        raise InvalidInput(("body", missing), "required: give points, or timestamps and "
                           "values (one row of channel values per timestamp)")
    if len(values) != len(ts):
        raise InvalidInput(("body", "values"), f"expected {len(ts)} rows, one per "
                           f"timestamp, got {len(values)}")
    if len(ts) > settings.max_batch_points:
        raise InvalidInput(("body", "timestamps"), f"at most {settings.max_batch_points} "
                           f"points per request, got {len(ts)}")
    channels = len(values[0])
    if channels > settings.max_channels:
        raise InvalidInput(("body", "values", 0),
                           f"at most {settings.max_channels} channels, got {channels}")
    try:
        rows = np.array(values, dtype=np.float64)
    except ValueError:  # ragged: name the first row of another length
        rows = None
    if rows is None or rows.ndim != 2:
        i = next(i for i, row in enumerate(values) if len(row) != channels)
        raise InvalidInput(("body", "values", i), f"expected {channels} values like "
                           f"values[0], got {len(values[i])}")
    out = np.empty((len(ts), 1 + channels))
    try:
        out[:, 0] = ts  # epoch seconds; RFC 3339 stamps below
    except TypeError:
        out[:, 0] = [epoch(t) for t in ts]
    out[:, 1:] = rows
    return out


def check_points(points: np.ndarray, settings: Settings, loc: Loc = POINTS) -> None:
    """What every ingest path checks on (N, 1 + C) points: sizes, and the bounds that keep
    one point from bricking a stream (a stamp far in the future would bar every later
    point, a huge value overflows the detectors' arithmetic for good)."""
    if len(points) > settings.max_batch_points:
        raise InvalidInput(loc, f"at most {settings.max_batch_points} points per request, "
                           f"got {len(points)}")
    if points.shape[1] - 1 > settings.max_channels:
        raise InvalidInput((*loc, 0, "values"), f"at most {settings.max_channels} "
                           f"channels, got {points.shape[1] - 1}")
    for field, bad, why in bounds(points, settings):
        if bad.any():
            i, *j = (int(k) for k in np.argwhere(bad)[0])  # j: the channel, for values
            value = points[i, 1 + j[0]] if j else points[i, 0]
            raise InvalidInput((*loc, i, field, *j), f"{float(value)!r}: {why}")


def bounds(points: np.ndarray, settings: Settings
           ) -> list[tuple[str, np.ndarray, str]]:
    """Where (N, 1 + C) points break the bounds a point must keep: (field, where (N,) for
    "timestamp", (N, C) for "values", why). check_points refuses a batch for one; the
    ingest doors drop the points alone (service/ingest/engine.py)."""
    ts = points[:, 0]
    latest = time.time() + settings.timestamp_max_lead_seconds
    return [("timestamp", ~np.isfinite(ts), "must be finite"),
            ("timestamp", ts > latest, f"more than {settings.timestamp_max_lead_seconds:g} "
             "s ahead of the server clock (TSAD_TIMESTAMP_MAX_LEAD_SECONDS)"),
            ("timestamp", ts < settings.timestamp_min, f"before "
             f"{settings.timestamp_min!r} (TSAD_TIMESTAMP_MIN)"),
            ("values", np.abs(points[:, 1:]) > settings.value_max_abs,
             f"magnitude above {settings.value_max_abs:g} (TSAD_VALUE_MAX_ABS)")]


def columnar(error: InvalidInput) -> InvalidInput:
    """An error naming points.i of a batch sent as columns, naming the columns instead."""
    if error.loc is not None:
        error.loc = columnar_loc(error.loc)
    return error


# --- a stream's configuration ------------------------------------------------------------
def check_shape(channels: int, window: int, settings: Settings) -> None:
    if channels > settings.max_channels:
        raise InvalidInput(("body", "channels"), f"at most {settings.max_channels} channels "
                           f"per stream (TSAD_MAX_CHANNELS), got {channels}")
    if window > settings.max_window:
        raise InvalidInput(("body", "window"), f"at most {settings.max_window} points per "
                           f"window (TSAD_MAX_WINDOW), got {window}")


def stream_meta(stream: str, cfg: StreamConfigIn, settings: Settings,
                artifact: Artifact | None) -> StreamMeta:
    """A stream's configuration (PUT /streams/{id}) checked against the detectors and the
    artifact it names (loaded by the caller); the meta to store."""
    detector = cfg.detector or settings.default_detector
    window = cfg.window or settings.default_window
    if artifact is not None:
        window = _artifact_window(artifact, cfg)
        if cfg.params:
            raise InvalidInput(("body", "params"), f"artifact {artifact.name!r} is fitted "
                               "with its own config: no params")
    elif detector not in REGISTRY:
        raise InvalidInput(("body", "detector"), f"unknown detector {detector!r}; known: "
                           f"{sorted(REGISTRY)} or 'artifact:<name>'")
    elif not issubclass(REGISTRY[detector], Online):
        online = sorted(n for n, cls in REGISTRY.items() if issubclass(cls, Online))
        raise InvalidInput(("body", "detector"), f"detector {detector!r} is trained "
                           "offline: fit it with `tsad train` and bind 'artifact:<name>', "
                           f"or pick one that learns online: {online}")
    if artifact is None:
        if cfg.params:
            check_detector_params(detector, cfg.params)
        try:  # what its config refuses with this window (a window shorter than a part)
            stream_detector(settings, detector, window, cfg.params)
        except ValueError as exc:
            raise InvalidInput(("body", "params" if cfg.params else "window"),
                               f"{detector}: {exc}") from None
    if cfg.channel_names is not None and len(cfg.channel_names) != cfg.channels:
        raise InvalidInput(("body", "channel_names"), f"expected {cfg.channels} names, "
                           f"got {len(cfg.channel_names)}")
    threshold = cfg.threshold.model_dump(exclude_none=True) if cfg.threshold else None
    kind = (threshold or {}).get("kind") or settings.threshold_kind
    if kind == "fixed" and (threshold or {}).get("value") is None and (
            artifact is None or artifact.threshold is None):
        raise InvalidInput(("body", "threshold", "value"), "kind fixed needs a value")
    if cfg.alert_budget_per_day is not None and kind == "quantile":
        raise InvalidInput(("body", "alert_budget_per_day"),
                           "an alert budget needs threshold kind spot or dspot")
    if cfg.alert_budget_per_day is not None and (threshold or {}).get("q"):
        raise InvalidInput(("body", "alert_budget_per_day"),
                           "give either threshold.q or alert_budget_per_day, not both")
    return StreamMeta(stream=stream, channels=cfg.channels, window=window, detector=detector,
                      channel_names=cfg.channel_names, threshold=threshold or None,
                      alert_budget_per_day=cfg.alert_budget_per_day,
                      timestamps=cfg.timestamps, params=cfg.params or None)


def check_detector_params(detector: str, params: dict, loc: Loc = ("body", "params")) -> None:
    """A stream's own detector tunables: fields of the detector's Config, of its types,
    never the window (the stream's)."""
    if "window" in params:
        raise InvalidInput((*loc, "window"), "the window is the stream's (PUT "
                           "/streams/{id} window), not a detector parameter")
    try:
        check_params(detector, params)
    except ValueError as exc:
        raise InvalidInput(loc, str(exc)) from None


def _artifact_window(artifact: Artifact, cfg: StreamConfigIn) -> int:
    if cfg.window is not None and cfg.window != artifact.window:
        raise InvalidInput(("body", "window"), f"artifact {artifact.name!r} scores windows "
                           f"of {artifact.window} points, not {cfg.window}")
    if artifact.channels is not None and artifact.channels != cfg.channels:
        raise InvalidInput(("body", "channels"), f"artifact {artifact.name!r} was fitted "
                           f"on {artifact.channels} channels, not {cfg.channels}")
    return artifact.window


# --- feedback ----------------------------------------------------------------------------
def check_feedback(req: FeedbackRequest, settings: Settings) -> None:
    s = settings
    if len(req.ranges) > s.feedback_max_ranges:
        raise InvalidInput(("body", "ranges"), f"at most {s.feedback_max_ranges} ranges per "
                           f"request, got {len(req.ranges)}")
    for i, r in enumerate(req.ranges):
        if epoch(r.end) < epoch(r.start):
            raise InvalidInput(("body", "ranges", i, "end"), "must not be before start")
    if req.steps is not None and not req.adapt:
        raise InvalidInput(("body", "steps"), "steps needs adapt: true")
    if req.steps is not None and req.steps > s.feedback_max_steps:
        raise InvalidInput(("body", "steps"), f"at most {s.feedback_max_steps} "
                           f"(TSAD_FEEDBACK_MAX_STEPS), got {req.steps}")
    inline = sum(len(r.points or ()) for r in req.ranges)
    if inline > s.max_batch_points:
        raise InvalidInput(("body", "ranges"), f"at most {s.max_batch_points} inline points "
                           f"per request, got {inline}")


def inline_points(points: list[Point], channels: int, i: int,
                  settings: Settings) -> np.ndarray:
    """A feedback range's inline points as (K, 1 + C): the stream's channel count,
    strictly increasing stamps, within the bounds."""
    out = np.empty((len(points), 1 + channels))
    previous = -np.inf
    for k, p in enumerate(points):
        loc = ("body", "ranges", i, "points", k)
        if len(p.values) != channels:
            raise InvalidInput((*loc, "values"), f"the stream has {channels} channels, got "
                               f"{len(p.values)} values")
        ts = p.epoch()
        if not np.isfinite(ts) or ts <= previous:
            raise InvalidInput((*loc, "timestamp"), "timestamps must be finite and "
                               "strictly increase")
        previous = out[k, 0] = ts
        out[k, 1:] = p.values
    check_points(out, settings, ("body", "ranges", i, "points"))
    return out
