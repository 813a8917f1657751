"""A webhook receiver for tests: a real HTTP server in its own process.

    python tests/support/receiver.py --port 8123 --log requests.jsonl [--status 500]

Every POST is appended to the log as one JSON line (headers, body, whether the signature
verified with --secret) and answered with --status. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.webhooks.signing import verify  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--secret", default="")
    args = p.parse_args()
    lock = threading.Lock()  # one line per request, even from concurrent handler threads

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            record = {"path": self.path, "headers": headers, "body": json.loads(body),
                      "verified": verify(args.secret, headers.get("x-tsad-timestamp", ""),
                                         headers.get("x-tsad-signature", ""), body)}
            with lock, open(args.log, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.send_response(args.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 - readiness probe
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            return None

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the stdlib's 5 refuses a burst of concurrent deliveries
        daemon_threads = True

    Server(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
