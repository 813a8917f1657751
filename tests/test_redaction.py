"""No secret in any answer or log line (service/redaction.py).

The service runs as a real process, keys on, on a real password-protected Redis
(requirepass). Redis is taken down and brought back, and the service is restarted while it
is down; every answer (status, headers, body), every log line, every /metrics scrape and
the output of the `tsad` commands run meanwhile are searched for the Redis password, the
admin key and a webhook receiver's basic-auth password. Before: `GET /readyz` without a
key answered `unavailable: Redis unreachable at redis://:PASS@...`, and so did every 503
body (even for a made-up key) and the logs.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.logs import JsonFormatter
from service.metrics import ServiceMetrics
from service.process import ServiceProcess, free_port
from service.redaction import RedactingFormatter, register_secrets
from service.settings import Settings
from tests.conftest import RedisServer, wait_for
from tests.test_alerts import spiky

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "redis-pw-" + secrets.token_hex(12)
ADMIN = "admin-key-" + secrets.token_hex(16)
HOOK_PASSWORD = "hook-pw-" + secrets.token_hex(8)  # in a webhook URL: never registered
FORGED = "tsad_0123456789ab_" + "A" * 43  # a well-formed key nobody made
SECRETS = (PASSWORD, ADMIN, HOOK_PASSWORD)


class Transcript:
    """Every answer of the run, as text (status, headers, body)."""

    def __init__(self, url: str) -> None:
        self.url, self.lines = url, []

    def __call__(self, method: str, path: str, key: str | None = ADMIN,
                 **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)
        self.lines.append(f"{method} {path} -> {r.status_code} {dict(r.headers)} {r.text}")
        return r

    def outage(self) -> list[httpx.Response]:
        """What callers meet while Redis is down: 503s, with or without a key."""
        points = {"stream": "web-01", "points": spiky(5, [], start=900)}
        answers = [self("GET", "/readyz", key=None), self("POST", "/score", key=FORGED,
                                                           json=points),
                   self("POST", "/score", json=points), self("GET", "/streams"),
                   self("GET", "/alerts"), self("GET", "/webhooks"),
                   self("GET", "/keys"), self("GET", "/metrics", key=None)]
        assert [r.status_code for r in answers] == [503] * 7 + [200], self.lines[-8:]
        return answers


def tsad(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


@pytest.mark.slow
def test_no_secret_in_any_answer_or_log_line_through_a_redis_outage(tmp_path):
    redis = RedisServer(password=PASSWORD)
    redis.start()
    log = tmp_path / "service.log"
    env = {"REDIS_URL": redis.url, "TSAD_AUTH": "keys", "TSAD_ADMIN_KEY": ADMIN,
           "TSAD_LOG_LEVEL": "DEBUG", "TSAD_REDIS_TIMEOUT_SECONDS": "0.5",
           "TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 64}}', "TSAD_DEFAULT_WINDOW": "16",
           "TSAD_WEBHOOK_ALLOW_HOSTS": "127.0.0.1", "TSAD_WEBHOOK_MAX_ATTEMPTS": "1",
           "TSAD_WEBHOOK_POLL_SECONDS": "0.05"}
    hook = f"http://receiver:{HOOK_PASSWORD}@127.0.0.1:{free_port()}/hook"  # nobody there
    cli_output = []
    try:
        with ServiceProcess(env, log_path=log) as service:
            call = Transcript(service.url)
            assert call("GET", "/readyz", key=None).status_code == 200
            assert call("POST", "/webhooks", json={"url": hook}).status_code == 201
            listed = call("GET", "/webhooks").json()["webhooks"]
            assert listed[0]["url"].startswith("http://receiver:***@127.0.0.1:")
            scored = call("POST", "/score",
                          json={"stream": "web-01", "points": spiky(400, [300])})
            assert scored.status_code == 200, scored.text
            # the alert's delivery fails (nobody listens) and is dead-lettered, logged
            wait_for(lambda: call("GET", "/webhooks/dead-letters").json()["dead_letters"])
            redis.stop()
            down = call.outage()
            # the URL is rendered, without its password
            assert f"redis://:***@127.0.0.1:{redis.port}/0" in down[0].json()["checks"]["store"]
            assert "redis://:***@" in down[1].json()["message"]  # a made-up key's 503
            cli_env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis.url,
                       "HF_HUB_OFFLINE": "1"}
            cli_output.append(tsad("keys", "list", env=cli_env))
            cli_output.append(tsad("receive", "--port", str(free_port()), "--wait", "1",
                                   "--subscribe", f"http://admin:{PASSWORD}@127.0.0.1:"
                                   f"{free_port()}", "--api-key", ADMIN, env=cli_env))
            assert "http://admin:***@127.0.0.1:" in cli_output[-1], cli_output[-1]
        with ServiceProcess(env, log_path=log) as service:  # started while Redis is down
            call.url = service.url
            call.outage()
            redis.start()
            wait_for(lambda: call("GET", "/readyz", key=None).status_code == 200, timeout=30)
            # (this Redis keeps nothing across a restart: a fresh start, served again)
            again = call("POST", "/score", json={"stream": "web-01", "points": spiky(20, [])})
            assert again.status_code == 200, again.text
    finally:
        redis.stop()
    logged = log.read_text()
    assert "redis://:***@127.0.0.1" in logged  # rendered, redacted
    assert "receiver:***@127.0.0.1" in logged  # the dead letter's log line
    everything = {"answers": "\n".join(call.lines), "logs": logged,
                  "cli": "\n".join(cli_output)}
    for where, text in everything.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} in the {where}"


def test_metrics_labels_carry_no_url_credentials():
    """Label values are client data (a channel's name): a URL in one loses its password."""
    settings = Settings(detector_params={"*": {"warmup": 64}}, default_window=16,
                        metrics_streams="*", threshold_min_scores=50)
    with TestClient(create_app(settings, ServiceMetrics(CollectorRegistry()))) as client:
        names = ["cpu", f"https://probe:{HOOK_PASSWORD}@example.com/x"]
        assert client.put("/streams/web-01", json={"channels": 2, "channel_names": names,
                                                   "detector": "residual_linear"}
                          ).status_code == 201
        r = client.post("/score", json={"stream": "web-01", "points": spiky(300, [250])})
        assert any(p["anomaly"] for p in r.json()["results"]), r.text
        text = client.get("/metrics").text
    assert 'channel="https://probe:***@example.com/x"' in text
    assert HOOK_PASSWORD not in text


def test_a_registered_secret_is_cut_in_every_form_a_log_line_renders_it_in():
    """As is (a message, a traceback), percent-encoded (inside a URL), JSON-escaped (a
    structured log's field): the same secret, three spellings."""
    secret = 'pa"ss/w@rd-' + secrets.token_hex(6)
    register_secrets([secret])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(RedactingFormatter(JsonFormatter()))
    logger = logging.getLogger("tsad.test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        raise ConnectionError(f"AUTH {secret} refused")
    except ConnectionError:
        logger.exception("connect failed", extra={
            "url": f"redis://{quote(secret, safe='')}@cache:6379/0", "raw": secret})
    finally:
        logger.removeHandler(handler)
    line = out.getvalue()
    for form in (secret, quote(secret, safe=""), json.dumps(secret)[1:-1]):
        assert form not in line, form
    assert line.count("***") >= 3 and "connect failed" in line and "cache:6379" in line
