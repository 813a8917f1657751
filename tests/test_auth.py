"""API keys on a real service process (uvicorn) and a real Redis: 401 without a known key,
403 for a missing scope or another tenant's stream, revocation at the next request, keys
stored only as hashes; `tsad keys`; open mode confined to loopback."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.metrics import ServiceMetrics
from service.process import ServiceProcess
from service.receiver import subscribe
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "bootstrap-admin-key-for-tests-0123456789"
POINTS = [{"timestamp": float(t), "values": [math.sin(t / 5)]} for t in range(20)]


def tsad(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT,
                          env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=60)


def as_key(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def keyed(redis_server, tmp_path_factory):
    """One keyed service for the module: (base URL, Redis URL)."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    log = tmp_path_factory.mktemp("auth") / "service.log"
    env = {"REDIS_URL": redis_server.url, "TSAD_AUTH": "keys", "TSAD_ADMIN_KEY": ADMIN,
           "TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 64}}',
           "TSAD_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
           "TSAD_LOG_LEVEL": "INFO"}
    with ServiceProcess(env, log_path=log) as service:
        yield service.url, redis_server.url
    assert "authentication is OFF" not in log.read_text()


def create_key(url: str, *scopes: str, tenant: str | None = None) -> dict:
    r = httpx.post(f"{url}/keys", headers=as_key(ADMIN),
                   json={"name": "test", "scopes": list(scopes), "tenant": tenant})
    assert r.status_code == 201, r.text
    return r.json()


def test_no_key_or_an_unknown_key_is_401_and_health_stays_open(keyed):
    url, _ = keyed
    forged = "tsad_0123456789ab_" + "A" * 43
    for method, path, body in [("POST", "/score", {"stream": "s", "points": POINTS}),
                               ("GET", "/streams", None), ("GET", "/streams/s", None),
                               ("DELETE", "/streams/s", None), ("GET", "/alerts", None),
                               ("GET", "/webhooks", None), ("GET", "/keys", None)]:
        for key in (None, "nonsense", forged):
            r = httpx.request(method, f"{url}{path}", json=body, headers=as_key(key))
            assert r.status_code == 401, (method, path, key, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert ("missing API key" if key is None else "unknown or revoked API key") in \
                r.json()["message"]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200, path


def test_scopes(keyed):
    url, _ = keyed
    ingest = create_key(url, "ingest")["key"]
    read = create_key(url, "read")["key"]
    r = httpx.post(f"{url}/score", headers=as_key(ingest), json={"stream": "sc", "points": POINTS})
    assert r.status_code == 200, r.text
    r = httpx.get(f"{url}/streams/sc", headers=as_key(ingest))
    assert r.status_code == 403 and "lacks the 'read' scope" in r.json()["message"]
    assert httpx.get(f"{url}/streams/sc", headers=as_key(read)).json()["points_seen"] == 20
    assert httpx.get(f"{url}/alerts", headers=as_key(read)).status_code == 200
    for method, path in [("DELETE", "/streams/sc"), ("PUT", "/streams/sc"),
                         ("POST", "/streams/sc/feedback"), ("GET", "/webhooks"),
                         ("POST", "/keys")]:
        r = httpx.request(method, f"{url}{path}", headers=as_key(read), json={})
        assert r.status_code == 403 and "'admin' scope" in r.json()["message"], (path, r.text)
    r = httpx.post(f"{url}/score", headers=as_key(read), json={"stream": "sc", "points": POINTS})
    assert r.status_code == 403 and "'ingest' scope" in r.json()["message"]
    assert httpx.get(f"{url}/streams/sc", headers=as_key(ADMIN)).json()["points_seen"] == 20


def test_a_tenant_key_touches_only_its_own_streams(keyed):
    url, _ = keyed
    acme = create_key(url, "admin", tenant="acme")["key"]
    other = create_key(url, "ingest", tenant="globex")["key"]
    for key, stream in ((acme, "acme.cpu"), (other, "globex.cpu")):
        r = httpx.post(f"{url}/score", headers=as_key(key),
                       json={"stream": stream, "points": POINTS})
        assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/score", headers=as_key(acme),
                   json={"stream": "globex.cpu", "points": POINTS})
    assert r.status_code == 403
    assert "stream ids must start with 'acme.'" in r.json()["message"]
    for method, path in [("GET", "/streams/globex.cpu"), ("DELETE", "/streams/globex.cpu"),
                         ("GET", "/streams/acmeX.cpu/window"),
                         ("GET", "/alerts?stream=globex.cpu")]:
        r = httpx.request(method, f"{url}{path}", headers=as_key(acme))
        assert r.status_code == 403, (path, r.text)
    listed = httpx.get(f"{url}/streams", headers=as_key(acme)).json()["streams"]
    assert [s["stream"] for s in listed] == ["acme.cpu"]
    everyone = httpx.get(f"{url}/streams", headers=as_key(ADMIN)).json()["streams"]
    assert {"acme.cpu", "globex.cpu"} <= {s["stream"] for s in everyone}
    # webhooks and keys span tenants: an admin key with a tenant may not manage them
    for method, path in [("GET", "/webhooks"), ("GET", "/keys")]:
        r = httpx.request(method, f"{url}{path}", headers=as_key(acme))
        assert r.status_code == 403 and "without tenant" in r.json()["message"]
    assert httpx.delete(f"{url}/streams/acme.cpu", headers=as_key(acme)).status_code == 204
    assert httpx.get(f"{url}/streams/globex.cpu", headers=as_key(ADMIN)).status_code == 200


def test_revoking_over_http_takes_effect_at_the_next_request(keyed):
    url, _ = keyed
    created = create_key(url, "read")
    assert httpx.get(f"{url}/streams", headers=as_key(created["key"])).status_code == 200
    listed = httpx.get(f"{url}/keys", headers=as_key(ADMIN)).json()["keys"]
    assert created["id"] in {k["id"] for k in listed}
    assert all("key" not in k and "hash" not in k for k in listed)
    assert httpx.delete(f"{url}/keys/{created['id']}", headers=as_key(ADMIN)).status_code == 204
    r = httpx.get(f"{url}/streams", headers=as_key(created["key"]))
    assert r.status_code == 401 and "revoked" in r.json()["message"]
    assert httpx.delete(f"{url}/keys/{created['id']}", headers=as_key(ADMIN)).status_code == 404


def test_tsad_keys_create_list_revoke_on_the_services_redis(keyed):
    url, redis_url = keyed
    env = {"REDIS_URL": redis_url}
    made = tsad("keys", "create", "--name", "ci pipeline", "--scope", "ingest", "--scope",
                "read", "--tenant", "acme", env=env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()  # the key alone on stdout: KEY=$(tsad keys create ...)
    kid = key.split("_")[1]
    assert kid in made.stderr and "shown only now" in made.stderr
    r = httpx.post(f"{url}/score", headers=as_key(key), json={"stream": "acme.ci",
                                                              "points": POINTS})
    assert r.status_code == 200, r.text
    listed = tsad("keys", "list", env=env)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(kid))
    assert "ingest,read" in row and "acme" in row and "ci pipeline" in row
    assert key not in listed.stdout
    assert tsad("keys", "revoke", kid, env=env).returncode == 0
    assert httpx.get(f"{url}/streams", headers=as_key(key)).status_code == 401
    assert tsad("keys", "revoke", kid, env=env).returncode == 1
    bad = tsad("keys", "create", "--name", "x", "--scope", "ingest", "--tenant", "a.b", env=env)
    assert bad.returncode != 0 and "tenant" in bad.stderr
    no_redis = tsad("keys", "list", env={})
    assert no_redis.returncode != 0 and "REDIS_URL" in no_redis.stderr


def test_keys_are_stored_only_as_hashes(keyed, redis_server):
    url, _ = keyed
    created = create_key(url, "read")
    raw, secret = created["key"], created["key"].split("_", 2)[2]
    dump = subprocess.run(
        ["redis-cli", "-p", str(redis_server.port), "--no-raw", "HGETALL", "tsad:apikeys"],
        capture_output=True, text=True, check=True).stdout
    assert hashlib.sha256(raw.encode()).hexdigest() in dump  # what is kept
    assert secret not in dump and ADMIN not in dump  # never the key, nor the bootstrap key
    keys = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--scan"],
                          capture_output=True, text=True, check=True).stdout.split()
    for k in keys:  # nor anywhere else in Redis
        value = subprocess.run(["redis-cli", "-p", str(redis_server.port), "DUMP", k],
                               capture_output=True, check=True).stdout
        assert secret.encode() not in value and ADMIN.encode() not in value, k


def test_the_demo_receiver_subscribes_with_a_key(keyed):
    url, _ = keyed
    with pytest.raises(SystemExit, match="401"):
        subscribe(url, "http://127.0.0.1:9/hook", "s" * 16, wait=1)
    sub = subscribe(url, "http://127.0.0.1:9/hook", "s" * 16, wait=1, api_key=ADMIN)
    assert sub["url"] == "http://127.0.0.1:9/hook"
    r = httpx.post(f"{url}/webhooks", headers=as_key(ADMIN),
                   json={"url": "http://169.254.169.254/latest/meta-data/"})
    assert r.status_code == 422 and "body.url" in r.json()["message"]


def test_metrics_can_require_a_read_key(redis_url):
    env = {"REDIS_URL": redis_url, "TSAD_AUTH": "keys", "TSAD_ADMIN_KEY": ADMIN,
           "TSAD_METRICS_AUTH": "true"}
    with ServiceProcess(env) as service:
        assert httpx.get(f"{service.url}/metrics").status_code == 401
        assert httpx.get(f"{service.url}/metrics", headers=as_key(ADMIN)).status_code == 200
        assert httpx.get(f"{service.url}/readyz").status_code == 200


@pytest.mark.parametrize("metrics_auth", [False, True])
def test_openapi_declares_the_key_scheme_where_a_key_is_needed(metrics_auth):
    # was: /metrics declared the key although it is open by default (TSAD_METRICS_AUTH)
    app = create_app(Settings(auth="keys", admin_key=ADMIN, metrics_auth=metrics_auth),
                     ServiceMetrics(CollectorRegistry()))
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
        assert client.get("/metrics").status_code == (401 if metrics_auth else 200)
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "tsad_<id>_<secret>",
        "description": schema["components"]["securitySchemes"]["ApiKey"]["description"]}
    open_paths = {"/healthz", "/readyz"} | (set() if metrics_auth else {"/metrics"})
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            secured = op.get("security") == [{"ApiKey": []}]
            assert secured == (path not in open_paths), (method, path)
            assert secured == ({"401", "403"} <= set(op["responses"])), (method, path)


def test_open_mode_serves_loopback_only_and_says_so(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TSAD_AUTH": "open"}
    refused = tsad("serve", "--host", "0.0.0.0", "--port", "1", env=env)
    assert refused.returncode != 0
    assert "refusing to serve 0.0.0.0:1 without authentication" in refused.stderr
    assert "TSAD_AUTH=keys" in refused.stderr
    with pytest.raises(RuntimeError, match="refusing to serve"):
        create_app(Settings(host="10.0.0.5"))
    create_app(Settings(host="0.0.0.0", allow_open=True))  # explicitly accepted
    create_app(Settings(host="0.0.0.0", auth="keys"))
    log = tmp_path / "service.log"
    with ServiceProcess({"TSAD_LOG_LEVEL": "INFO"}, log_path=log) as service:
        assert httpx.post(f"{service.url}/score",
                          json={"stream": "s", "points": POINTS}).status_code == 200
    warning = next(line for line in log.read_text().splitlines()
                   if "authentication is OFF" in line)
    assert '"level": "WARNING"' in warning
