"""`tsad demo`: first contact that ends in a verdict.

Writes a synthetic stream (one point a minute for the last eight hours: a smooth cycle
with a little noise, and one spike near the end) to ``runs/demo/demo.csv`` and replays it
into a running service with `tsad replay --reset`: the first points warm the stream's
detector up, then every point is scored, the spike is flagged and opens an alert, and
the alert is listed with a summary.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from service.auth.keys import API_KEY_ENV
from service.replay import add_url_argument

POINTS = 480  # the default detector scores from the 321st point (README, First contact)
SPIKE = 440
OUT = Path("runs/demo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="send a synthetic stream with one spike and show the "
                       "anomaly and its alert", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_url_argument(p)
    p.add_argument("--stream", default="demo", help="stream id (deleted first)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"API key with the admin scope; default ${API_KEY_ENV}")
    p.set_defaults(func=run)


def demo_series(now: float, seed: int = 0) -> np.ndarray:
    """(POINTS, 2): timestamps (one a minute, the last one ``now``) and values.

    >>> s = demo_series(1_700_000_000.0)
    >>> s.shape, float(s[-1, 0]), int(np.argmax(s[:, 1]))
    ((480, 2), 1700000000.0, 440)
    """
    rng = np.random.default_rng(seed)
    t = np.arange(POINTS)
    values = 50 + 10 * np.sin(2 * np.pi * t / 60) + rng.normal(0, 0.5, POINTS)
    values[SPIKE] += 40.0
    stamps = now - 60.0 * (POINTS - 1 - t)
    return np.stack([stamps, values], axis=1)


def run(args: argparse.Namespace) -> int:
    from service import replay

    replay.require_service(args.url)  # before writing anything: one line if none answers
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "demo.csv"
    series = demo_series(float(int(time.time())))
    np.savetxt(path, series, delimiter=",", header="timestamp,value", comments="",
               fmt=["%.0f", "%.4f"])
    print(f"{POINTS} points (one a minute, a spike at point {SPIKE + 1}) -> {path}")
    return replay.run(argparse.Namespace(
        file=path, stream=args.stream, url=args.url, api_key=args.api_key, batch=100,
        rate=0.0, start=0.0, step=1.0, out=None, plot=None, windows=None, quiet=False,
        reset=True))
