"""`tsad receive`: a small webhook receiver that logs the alerts it gets (demo and smoke tests).

    tsad receive --port 9000 --subscribe http://127.0.0.1:8000 \\
        --public-url http://127.0.0.1:9000/hook --secret a-long-random-secret-of-yours

On start, with --subscribe, it subscribes itself to the service (POST /webhooks), waiting
for the service to answer; a subscription of the same URL left by an earlier run is
reused (updated in place with this run's secret, glob and severity), so a restart neither
multiplies deliveries nor loses the ones pending for it (further duplicates of the URL are
removed, their pending deliveries dead-lettered). Every POST is checked against the
secret (X-Tsad-Signature), logged as one line on stdout and, with --log, appended as JSON
lines (headers, body, verified). Duplicate deliveries (same Idempotency-Key) are logged
but flagged. GET answers 204 once the receiver is subscribed (503 before: a health check
that says deliveries can come). Stdlib HTTP server, no extra dependency.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from service.auth.keys import API_KEY_ENV, bearer
from service.redaction import redact_url
from service.replay import add_url_argument, apart, message, unreachable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "receive", help="run a webhook receiver that logs alerts (demo)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--path", default="/hook", help="path events are POSTed to")
    p.add_argument("--secret", default=None,
                   help="signing secret (at least 16 characters); generated when omitted")
    add_url_argument(p, "--subscribe", default=None,
                     what="subscribe this receiver on start to the service at this base URL, "
                     "e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"--subscribe: an admin API key without tenant; default ${API_KEY_ENV}")
    p.add_argument("--public-url", help="URL the service reaches this receiver at "
                   "(default http://HOST:PORT/PATH)")
    p.add_argument("--streams", default="*", help="stream glob of the subscription")
    p.add_argument("--min-severity", choices=["warning", "critical"], default="warning")
    p.add_argument("--status", type=int, default=200, help="HTTP status to answer POSTs with")
    p.add_argument("--log", type=Path, help="append every request here as a JSON line")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for the service when subscribing")
    p.set_defaults(func=run)


def subscribe(service_url: str, hook_url: str, secret: str, streams: str = "*",
              min_severity: str = "warning", wait: float = 120.0,
              api_key: str | None = None) -> dict:
    """Subscribe ``hook_url`` with ``secret``: the oldest existing subscription of that URL
    is updated in place (its pending deliveries are kept), else a new one is created."""
    import httpx

    deadline = time.monotonic() + wait
    waiting = False
    with httpx.Client(base_url=service_url, timeout=10, headers=bearer(api_key)) as http:
        while True:
            try:
                existing = http.get("/webhooks")
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise SystemExit(unreachable(service_url, exc).replace(
                        "--url", "--subscribe")) from None
                if not waiting:  # say why nothing happens yet, once
                    print(f"waiting up to {wait:.0f} s for the service at {service_url} "
                          "(`make serve` starts one)", flush=True)
                    waiting = True
                time.sleep(1.0)
                continue
            if existing.status_code in (401, 403):  # waiting will not help
                raise SystemExit(f"subscription refused: {existing.status_code} "
                                 f"{message(existing)} (--api-key / ${API_KEY_ENV})")
            if existing.status_code == 200:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"subscription refused: {existing.status_code} "
                                 f"{message(existing)}")
            time.sleep(1.0)  # e.g. 503 while the service starts
        fields = {"secret": secret, "streams": streams, "min_severity": min_severity,
                  "description": "tsad receive (demo receiver)"}
        shown = redact_url(hook_url)  # the service shows URLs without their password
        mine = [s for s in existing.json()["webhooks"] if s["url"] == shown]  # oldest first
        for extra in mine[1:]:
            http.delete(f"/webhooks/{extra['id']}").raise_for_status()
        if mine:
            r = http.patch(f"/webhooks/{mine[0]['id']}", json=fields)
            ok = 200
        else:
            r = http.post("/webhooks", json={"url": hook_url, **fields})
            ok = 201
        if r.status_code != ok:
            raise SystemExit(f"subscription refused: {r.status_code} {message(r)}")
        return r.json()


def describe(event: dict) -> str:
    """One human line per event.

    >>> print(describe({"type": "alert.opened", "alert": {
    ...     "stream": "s", "severity": "warning", "peak_score": 9.5, "threshold": 3.2,
    ...     "channels": ["0"], "opened_at": 0}}))  # doctest: +NORMALIZE_WHITESPACE
    alert.opened stream=s severity=warning peak=9.5 threshold=3.2 channels=0
    opened=1970-01-01T00:00:00Z
    """
    a = event.get("alert", {})
    opened = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.get("opened_at", 0)))
    peak, threshold = apart(a.get("peak_score", 0), a.get("threshold", 0))
    return (f"{event.get('type')} stream={a.get('stream')} severity={a.get('severity')} "
            f"peak={peak} threshold={threshold} "
            f"channels={','.join(a.get('channels', []))} opened={opened}")


def make_server(host: str, port: int, path: str, secret: str, status: int = 200,
                log_path: Path | None = None,
                ready: threading.Event | None = None) -> ThreadingHTTPServer:
    from service.webhooks.signing import verify

    lock = threading.Lock()  # one line per request, even from concurrent handler threads
    seen: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            verified = verify(secret, headers.get("x-tsad-timestamp", ""),
                              headers.get("x-tsad-signature", ""), body)
            try:
                event = json.loads(body)
            except ValueError:
                event = {}
            key = headers.get("idempotency-key", "")
            with lock:
                duplicate = key in seen
                seen.add(key)
                line = describe(event) if isinstance(event, dict) else "not an event"
                flags = (" signature ok" if verified else " UNVERIFIED: bad signature") + (
                    " duplicate" if duplicate else "")
                print(f"{line}{flags}", flush=True)
                if log_path:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"path": self.path, "headers": headers,
                                            "body": event, "verified": verified}) + "\n")
            self.send_response(status if self.path.split("?")[0] == path else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 - health check
            self.send_response(204 if ready is None or ready.is_set() else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            return None

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the stdlib's 5 refuses a burst of concurrent deliveries
        daemon_threads = True
        allow_reuse_address = True

    return Server((host, port), Handler)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise
    secret = args.secret or f"whsec_{secrets.token_hex(16)}"
    if len(secret) < 16:
        raise SystemExit("--secret needs at least 16 characters")
    ready = threading.Event()
    server = make_server(args.host, args.port, args.path, secret, args.status, args.log, ready)
    public = args.public_url or f"http://{args.host}:{args.port}{args.path}"
    print(f"receiving on http://{args.host}:{args.port}{args.path}", flush=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()  # listen before subscribing: the first delivery may come at once
    try:
        if args.subscribe:
            sub = subscribe(args.subscribe, public, secret, args.streams, args.min_severity,
                            args.wait, args.api_key)
            print(f"subscribed {public} to {args.subscribe} as {sub['id']}", flush=True)
        ready.set()
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0

