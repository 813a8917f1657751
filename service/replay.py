"""`tsad replay`: post a recorded series to a running service, as a live producer would.

CSV files need a header; the first column is the timestamp (epoch seconds or an ISO 8601 /
RFC 3339 date-time, naive = UTC), the others are channel values. ``.npy`` files are
(T, C) arrays; their timestamps are the row numbers (or --start + row * --step).

Every time stamp it prints is RFC 3339 (UTC). At the end it lists the alerts the stream
raised during the replay (GET /alerts) and prints a JSON summary (points, scored,
anomalies, alerts, the median likelihood of the points not flagged, request latency).
``--plot`` draws the series, the scores against the threshold, the anomalies and the
alerts into runs/plots/STREAM.png (or ``--plot PATH.png``; needs matplotlib: ``make
extras EXTRA=plot``). When the file has labelled
anomaly windows (NAB's ``combined_windows.json`` beside it or up to two folders above, or
``--windows``), the plot shades them and marks each one hit (an anomalous point inside)
or missed, and the summary counts them.

A stream only takes points after its last stored one: to replay a file into a stream that
already has it, add ``--reset`` (deletes the stream first).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.auth.keys import API_KEY_ENV, bearer

PLOT_DIR = Path("runs/plots")  # `--plot` without a path: here (/runs/ is ignored by git)
DEFAULT_URL = "http://127.0.0.1:8000"  # where `make serve` listens


def add_url_argument(parser: argparse.ArgumentParser, flag: str = "--url",
                     default: str | None = DEFAULT_URL, what: str = "service base URL") -> None:
    """The service URL flag of the client commands (replay, demo, receive)."""
    where = f" (default {default})" if default else ""
    parser.add_argument(flag, default=default, metavar="URL",
                        help=f"{what}{where}; a service started with `PORT=8123 make serve` "
                        "is at http://127.0.0.1:8123")


def unreachable(url: str, exc: Exception) -> str:
    """One line for a service that does not answer, saying what to do."""
    reason = str(exc).split("] ", 1)[-1] or type(exc).__name__  # "[Errno 111] Connection refused"
    return (f"no tsad service answers at {url} ({reason}): start one with `make serve` "
            "in another terminal, or pass --url with the address it listens on")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="post a CSV/NPY series to /score in batches",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="CSV (timestamp,value[,value...]) or .npy (T, C)")
    p.add_argument("--stream", required=True, help="stream id to post to")
    add_url_argument(p)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"API key with the ingest scope (admin for --reset); default "
                   f"${API_KEY_ENV}")
    p.add_argument("--batch", type=int, default=100, help="points per request (default 100)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="points per second to send; 0 = as fast as the service answers")
    p.add_argument("--start", type=float, default=0.0, help=".npy: first timestamp")
    p.add_argument("--step", type=float, default=1.0, help=".npy: seconds between rows")
    p.add_argument("--out", type=Path, help="write every result as JSON lines here")
    p.add_argument("--plot", type=Path, metavar="PNG", nargs="?", const=PLOT_DIR,
                   help="draw series, scores, threshold, alerts and labelled windows into "
                   f"this PNG, or STREAM.png in this folder (matplotlib; default "
                   f"{PLOT_DIR}/STREAM.png)")
    p.add_argument("--windows", type=Path, metavar="JSON",
                   help="labelled anomaly windows in NAB's combined_windows.json layout "
                   "(default: one found beside the file or up to two folders above)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no line per anomalous point (the bar is off "
                   "anyway when stderr is not a terminal)")
    p.add_argument("--reset", action="store_true",
                   help="delete the stream first (its window and detector state), so the "
                   "same file can be replayed again")
    p.set_defaults(func=run)


def load_series(path: Path, start: float = 0.0, step: float = 1.0) -> np.ndarray:
    """(T, 1 + C): timestamps (epoch seconds) then values."""
    if path.suffix == ".npy":
        values = np.load(path).astype(np.float64)
        values = values[:, None] if values.ndim == 1 else values
        return np.column_stack([start + step * np.arange(len(values)), values])
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f)][1:]
    return np.array([[parse_timestamp(r[0]), *map(float, r[1:])] for r in rows if r])


def parse_timestamp(text: str) -> float:
    """Epoch seconds or ISO 8601 (naive means UTC).

    >>> parse_timestamp("2014-07-01 00:30:00")
    1404174600.0
    >>> parse_timestamp("1404174600")
    1404174600.0
    """
    try:
        return float(text)
    except ValueError:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def run(args: argparse.Namespace) -> int:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    if args.plot is not None:
        require_matplotlib()  # fail before sending anything, not after the whole replay
        if not args.plot.suffix:  # a folder
            args.plot = args.plot / f"{args.stream}.png"
    series = load_series(args.file, args.start, args.step)
    windows = labelled_windows(args.file, args.windows)
    if len(series) == 0:
        print(f"{args.file}: no points")
        return 1
    latencies: list[float] = []
    results: list[dict] = []
    out = open(args.out, "w") if args.out else None  # noqa: SIM115
    try:
        alerts = _send(args, series, results, latencies, out)
    except httpx.ConnectError as exc:  # no service (or it went away): one line, no traceback
        sent = len(results)
        raise SystemExit(unreachable(args.url, exc) if not sent else
                         f"lost the service at {args.url} after {sent} points: {exc}") from None
    except httpx.TransportError as exc:
        raise SystemExit(f"the service at {args.url} stopped answering after "
                         f"{len(results)} points: {exc or type(exc).__name__}") from None
    finally:
        if out:
            out.close()
    if alerts is None:
        return 1
    for a in sorted(alerts, key=lambda a: a["opened_at"]):
        print(describe_alert(a))
    summary = summarize(args.stream, series, results, alerts, latencies)
    if windows is not None:
        summary["windows"] = window_hits(series[:, 0], results, windows)
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(args.plot, args.stream, series, results, alerts, windows)
        summary["plot"] = str(args.plot)
    print(json.dumps(summary))
    return 0


def _send(args: argparse.Namespace, series: np.ndarray, results: list[dict],
          latencies: list[float], out) -> list[dict] | None:  # noqa: ANN001
    """POST the series in batches (results and latencies appended as they come); the
    stream's alerts, or None after an error it has printed."""
    import httpx
    from tqdm import tqdm

    began = time.monotonic()
    with httpx.Client(base_url=args.url, timeout=60, headers=bearer(args.api_key)) as http, tqdm(
        total=len(series), unit="pt", desc=args.stream, disable=True if args.quiet else None
    ) as bar:
        earlier: set[str] = set()  # alerts of the stream's earlier lives: not this replay's
        if args.reset:
            resp = http.delete(f"/streams/{args.stream}")
            if resp.status_code not in (204, 404):
                print(f"error {resp.status_code} deleting {args.stream}: {message(resp)}",
                      file=sys.stderr)
                return None
            earlier = {a["id"] for a in fetch_alerts(http, args.stream, float(series[0, 0]))}
        for lo in range(0, len(series), args.batch):
            chunk = series[lo:lo + args.batch]
            body = {"stream": args.stream, "points": [
                {"timestamp": float(r[0]), "values": r[1:].tolist()} for r in chunk]}
            t0 = time.perf_counter()
            resp = post_score(http, body)
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                bar.close()
                # a file sent again: the hint alone says what happened and what to do
                hint = (start_over_hint(http, args.stream, float(chunk[0, 0]))
                        if resp.status_code == 422 else None)
                print(hint or f"error {resp.status_code} at point {lo}: {message(resp)}",
                      file=sys.stderr)
                return None
            for r in resp.json()["results"]:
                results.append(r)
                if r["anomaly"] and not args.quiet:
                    tqdm.write(f"anomaly at {iso(epoch(r['timestamp']))}: "
                               f"{versus(r['score'], r['threshold'])}")
                if out:
                    out.write(json.dumps(r) + "\n")
            bar.update(len(chunk))
            if args.rate > 0:  # pace to the requested rate
                ahead = (lo + len(chunk)) / args.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
        return [a for a in fetch_alerts(http, args.stream, since=float(series[0, 0]))
                if a["id"] not in earlier]


def require_service(url: str) -> None:
    """Exit with one line saying what to do when no service answers at ``url``."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line for this request
    try:
        httpx.get(f"{url.rstrip('/')}/healthz", timeout=10)
    except httpx.TransportError as exc:
        raise SystemExit(unreachable(url, exc)) from None


def message(resp) -> str:  # noqa: ANN001
    """The service's own explanation of a refusal (its ``message``), else the body."""
    try:
        return str(resp.json()["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:500]


def post_score(http, body: dict, attempts: int = 5):  # noqa: ANN001, ANN201
    """POST /score; a 503 (store unavailable: nothing was stored) is retried after its
    Retry-After, so a replay rides out a Redis restart. Anything else is returned."""
    for attempt in range(1, attempts + 1):
        resp = http.post("/score", json=body)
        if resp.status_code != 503 or attempt == attempts:
            return resp
        time.sleep(min(float(resp.headers.get("Retry-After", 1)), 30))
    raise AssertionError("unreachable")


def start_over_hint(http, stream: str, first: float) -> str | None:  # noqa: ANN001
    """When a 422 comes from a stream that already holds points at or after this batch's
    first time stamp (the file was replayed before), how to start over."""
    try:
        resp = http.get(f"/streams/{stream}")
    except Exception:  # noqa: BLE001 - only a hint: the 422 was already printed
        return None
    last = resp.json().get("last_timestamp") if resp.status_code == 200 else None
    if last is None or last < first:
        return None
    return (f"stream {stream!r} already holds points up to {iso(last)}, so these are not "
            f"new: add --reset to delete it and replay from the start, or use another "
            f"--stream")


def fetch_alerts(http, stream: str, since: float) -> list[dict]:  # noqa: ANN001
    """Every alert of ``stream`` opened at or after ``since`` (stream time), all pages."""
    alerts: list[dict] = []
    params: dict = {"stream": stream, "since": since, "limit": 500}
    while True:
        resp = http.get("/alerts", params=params)
        if resp.status_code != 200:
            raise SystemExit(f"error {resp.status_code} listing the alerts of {stream}: "
                             f"{message(resp)}")
        page = resp.json()
        alerts += page["alerts"]
        if not page.get("next_cursor"):
            return alerts
        params["cursor"] = page["next_cursor"]


def epoch(ts: float | str) -> float:
    """A result's timestamp (echoed as sent: epoch seconds or RFC 3339) in epoch seconds."""
    return float(ts) if isinstance(ts, int | float) else parse_timestamp(ts)


def iso(ts: float) -> str:
    """RFC 3339 in UTC, the one format replay prints (milliseconds only when there are any).

    >>> iso(1404174600), iso(1404174600.25)
    ('2014-07-01T00:30:00Z', '2014-07-01T00:30:00.250Z')
    """
    t = datetime.fromtimestamp(ts, UTC)
    if t.microsecond:
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def apart(a: float, b: float) -> tuple[str, str]:
    """a and b to 3 significant digits, or as many more as it takes to print unequal
    numbers unequal: a score just over its threshold never reads ``1.01 > 1.01``.

    >>> apart(2.7113, 1.01), apart(1.0123, 1.01), apart(1.0004, 1.0)
    (('2.71', '1.01'), ('1.012', '1.01'), ('1.0004', '1'))
    """
    for digits in range(3, 18):
        x, y = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if x != y or a == b:
            break
    return x, y


def versus(score: float, threshold: float) -> str:
    """``score S > threshold T`` with digits enough to tell them apart (``>=`` when equal:
    a score at a fixed cut is a verdict).

    >>> versus(1.0123, 1.01), versus(1.01, 1.01)
    ('score 1.012 > threshold 1.01', 'score 1.01 >= threshold 1.01')
    """
    s, t = apart(score, threshold)
    return f"score {s} {'>' if score > threshold else '>='} threshold {t}"


def labelled_windows(path: Path, windows_file: Path | None = None
                     ) -> list[tuple[float, float]] | None:
    """The labelled anomaly windows of ``path`` (epoch seconds, inclusive), from NAB's
    ``combined_windows.json`` layout: ``{"folder/file.csv": [["start", "end"], ...]}``.
    Without ``windows_file``, one beside the file or up to two folders above is used. The
    key is the file's path relative to that folder, else its name when one key alone ends
    with it. None when no windows are known for the file.

    >>> w = labelled_windows(Path(__file__).parents[1] / "tests/data/nab/nyc_taxi.csv")
    >>> len(w), iso(w[0][0]), iso(w[0][1])
    (5, '2014-10-30T15:30:00Z', '2014-11-03T22:30:00Z')
    """
    path = path.resolve()
    if windows_file is not None:
        candidates = [windows_file]
    else:
        candidates = [d / "combined_windows.json" for d in path.parents[:3]]
    for found in candidates:
        if not found.is_file():
            continue
        table = json.loads(found.read_text())
        try:
            key = path.relative_to(found.resolve().parent).as_posix()
        except ValueError:
            key = None
        if key not in table:
            named = [k for k in table if Path(k).name == path.name]
            key = named[0] if len(named) == 1 else None
        if key is not None:
            return [(parse_timestamp(a), parse_timestamp(b)) for a, b in table[key]]
        if windows_file is not None:
            raise SystemExit(f"--windows: {windows_file} has no entry for {path.name}")
    return None


def window_hits(ts: np.ndarray, results: list[dict],
                windows: list[tuple[float, float]]) -> dict:
    """Which labelled windows had an anomalous point inside (hit) and which had none
    (missed), and how many anomalous points fell outside every window.

    >>> r = [{"anomaly": a} for a in (False, True, False, False, True)]
    >>> window_hits(np.arange(5.0), r, [(0, 1), (2, 3)])
    {'labelled': 2, 'hit': 1, 'missed': ['1970-01-01T00:00:02Z'], 'anomalies_outside': 1}
    """
    flagged = ts[np.array([bool(r["anomaly"]) for r in results], dtype=bool)]
    inside = np.zeros(len(flagged), dtype=bool)
    missed = []
    for a, b in windows:
        hit = (flagged >= a) & (flagged <= b)
        inside |= hit
        if not hit.any():
            missed.append(iso(a))
    return {"labelled": len(windows), "hit": len(windows) - len(missed), "missed": missed,
            "anomalies_outside": int((~inside).sum())}


def describe_alert(a: dict) -> str:
    end = f"resolved {iso(a['resolved_at'])}" if a.get("resolved_at") else "still open"
    peak, threshold = apart(a['peak_score'], a['threshold'])
    ratio = apart(a['peak_ratio'], 1.0)[0]  # a peak just over its threshold reads above 1
    return (f"alert {a['id']} {a['severity']}: opened {iso(a['opened_at'])}, {end}; "
            f"peak {peak} = {ratio} x threshold {threshold} at "
            f"{iso(a['peak_at'])}, {a['anomalous_points']} anomalous points, channels "
            f"{','.join(a['channels'])}")


def summarize(stream: str, series: np.ndarray, results: list[dict], alerts: list[dict],
              latencies: list[float]) -> dict:
    lat = np.array(latencies) * 1000
    normal = [r["likelihood"] for r in results
              if r["likelihood"] is not None and not r["anomaly"]]
    return {
        "stream": stream, "points": len(series),
        "scored": sum(r["status"] == "scored" for r in results),
        "anomalies": sum(bool(r["anomaly"]) for r in results),
        "alerts": len(alerts),
        "alerts_open": sum(a["state"] == "open" for a in alerts),
        "alerts_critical": sum(a["severity"] == "critical" for a in alerts),
        # about 0.5 on a stream's ordinary points (models/calibration.py); higher where
        # windows still hold an anomaly
        "likelihood_median_normal": None if not normal else round(float(np.median(normal)), 3),
        "requests": len(lat),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                       "p95": round(float(np.percentile(lat, 95)), 2),
                       "max": round(float(lat.max()), 2)},
    }


def require_matplotlib():  # noqa: ANN201
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: `make extras EXTRA=plot` from the repository "
                         "root (or `.venv/bin/pip install -e '.[plot]'`)") from exc
    matplotlib.use("Agg")  # files only, never a window
    return matplotlib


def plot(path: Path, stream: str, series: np.ndarray, results: list[dict],
         alerts: list[dict], windows: list[tuple[float, float]] | None = None,
         max_channels: int = 8) -> None:
    """Two panels sharing the time axis: the values, then the score against the threshold
    (log scale); anomalous points in red, alerts shaded from opening to resolution,
    labelled windows (when given) outlined green when hit, grey and hatched when missed."""
    require_matplotlib()
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    ts = series[:, 0]
    as_dates = ts.min() > 1e8  # epoch seconds; row numbers (.npy) stay numbers

    def x(values):  # noqa: ANN001, ANN202
        values = np.asarray(values, dtype=float)
        return values.astype("datetime64[s]") if as_dates else values

    score = np.array([np.nan if r["score"] is None else r["score"] for r in results])
    threshold = np.array([np.nan if r["threshold"] is None else r["threshold"]
                          for r in results])
    flagged = np.array([bool(r["anomaly"]) for r in results])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    channels = series.shape[1] - 1
    for c in range(min(channels, max_channels)):
        top.plot(x(ts), series[:, 1 + c], lw=0.7,
                 label=f"channel {c}" if channels > 1 else "value")
    if flagged.any():
        top.scatter(x(ts[flagged]), series[flagged, 1], s=14, color="red", zorder=3,
                    label="anomalous point")
    positive = np.where(score > 0, score, np.nan)  # log scale: zeros are not drawable
    bottom.plot(x(ts), positive, lw=0.6, color="tab:blue", label="score")
    bottom.plot(x(ts), threshold, lw=1.2, color="black", ls="--", label="threshold")
    if flagged.any():
        bottom.scatter(x(ts[flagged]), positive[flagged], s=14, color="red", zorder=3,
                       label="anomaly")
    bottom.set_yscale("log")
    if np.isfinite(positive).any():  # the far low tail of the scores says nothing
        bottom.set_ylim(bottom=np.nanpercentile(positive, 1))
    labelled: set[str] = set()
    for a in alerts:
        end = a.get("resolved_at") or a["updated_at"]
        label = f"{a['severity']} alert"
        for ax in (top, bottom):
            ax.axvspan(x([a["opened_at"]])[0], x([max(end, a["opened_at"] + 1)])[0],
                       color="orange" if a["severity"] == "warning" else "crimson",
                       alpha=0.3, label=label if ax is top and label not in labelled else None)
        labelled.add(label)
    title = f"{stream}: {len(ts)} points, {int(flagged.sum())} anomalous, {len(alerts)} alerts"
    if windows is not None:
        hits = window_hits(ts, results, windows)
        missed = set(hits["missed"])
        for a, b in windows:
            hit = iso(a) not in missed
            label = "labelled window, hit" if hit else "labelled window, missed"
            for ax in (top, bottom):
                ax.axvspan(x([a])[0], x([max(b, a + 1)])[0], fill=False, lw=1.5,
                           edgecolor="green" if hit else "dimgray", hatch=None if hit else "//",
                           label=label if ax is top and label not in labelled else None)
            labelled.add(label)
        title += (f"; labelled windows: {hits['hit']}/{hits['labelled']} hit, "
                  f"{hits['anomalies_outside']} anomalous points outside them")
    top.set_ylabel("value")
    bottom.set_ylabel("score (log)")
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8, ncol=4)
    bottom.legend(loc="upper left", fontsize=8, ncol=3)
    if as_dates:
        locator = mdates.AutoDateLocator()
        bottom.xaxis.set_major_locator(locator)
        bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
