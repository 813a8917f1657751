"""README.md's and service/README.md's shell examples, pasted as written, against a live
service: a real `tsad` process on Redis (so `tsad keys` reaches the same store), real HTTP.

Every command of their ```bash blocks either runs here (and must succeed: exit 0, no
HTTP error, no traceback) or is named in NOT_HERE with the reason; a new example that is
neither fails the test. The only rewrites are the address (the service listens on a free
port, not 8000), the venv's path, and the placeholder key id of `tsad keys revoke`."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.process import ServiceProcess, free_port
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "service/README.md")
BIN = Path(sys.executable).absolute().parent
# commands (by how they start) that cannot run in a test, and why
NOT_HERE = {
    "make serve": "the test's own service stands in for it",
    "TSAD_SHADOWS_ALLOW_COSTLY=true make serve": "the test's own service, with the setting",
    "make test": "this is make test",
    "docker compose": "no Docker engine here; tests/test_deploy_config.py checks the stack",
    "echo ": "writes the compose stack's secrets into .env",
    "REDIS_URL=redis://10.0.0.11": "needs a Redis Cluster at that address; "
                                   "tests/test_cluster.py runs the topology",
    "curl -s -X PUT localhost:8000/watches/": "a watch needs a Prometheus to query "
        "(TSAD_PROMETHEUS_URL): tests/test_prometheus_e2e.py runs watches on a real one, "
        "tests/test_ingest.py checks this body against the watch API's model",
}


def commands(doc: str) -> list[str]:
    """The commands of a doc's ```bash blocks: continuation lines and quoted strings that
    span lines joined, as a shell reads them."""
    out, block, pending = [], None, ""
    for line in (ROOT / doc).read_text().splitlines():
        if line.startswith("```"):
            block = [] if block is None and line.strip() == "```bash" else None
            continue
        if block is None:
            continue
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if pending.endswith("\\"):
            continue
        if pending.strip():
            out.append(pending.strip())
        pending = ""
    return out


def as_run_here(command: str, url: str) -> str:
    """The command against the test's service and this venv."""
    command = re.sub(r"(?<![\w/])\.venv/bin/", f"{BIN}/", command)
    command = re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", url.removeprefix("http://"),
                     command)
    if re.match(rf"^(?:{re.escape(str(BIN))}/)?tsad (demo|replay)\b", command):
        command += f" --url {url}"  # the README says: another port needs --url
    if command.startswith("curl "):
        command = command.replace("curl ", "curl --fail-with-body ", 1)
    return command


@pytest.fixture(scope="module")
def service(redis_server, tmp_path_factory):
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    logs = tmp_path_factory.mktemp("readme") / "service.log"
    # no DNS here: the README's webhook host is allowed by name (a real one resolves); the
    # loopback receiver needs nothing: an open service bound to loopback takes it as pasted
    env = {"REDIS_URL": redis_server.url, "TSAD_AUTH": "open",
           "TSAD_WEBHOOK_ALLOW_HOSTS": "hooks.example.com",
           "TSAD_WEBHOOK_BACKOFF_SECONDS": "600",  # hooks.example.com: one try, then quiet
           "TSAD_SHADOWS_ALLOW_COSTLY": "true"}  # the README's shadow example
    with ServiceProcess(env, log_path=logs) as proc:
        yield proc, redis_server.url


def run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)


@pytest.mark.slow
def test_every_shell_example_runs_against_a_live_service(service):
    proc, redis_url = service
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "REDIS_URL": redis_url,
           "PYTHONPATH": str(ROOT)}
    ran, key_id = [], None
    for doc in DOCS:
        for command in commands(doc):
            if any(command.startswith(prefix) for prefix in NOT_HERE):
                continue
            if command.startswith("tsad keys revoke") and key_id:
                command = re.sub(r"revoke \S+", f"revoke {key_id}", command)
            done = run(as_run_here(command, proc.url), env)
            where = f"{doc}: {command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            assert done.returncode == 0, where
            assert "Traceback" not in done.stderr, where
            if command.startswith("tsad keys create"):
                key_id = re.search(r"created key (\w+)", done.stdout + done.stderr).group(1)
            ran.append((doc, command, done.stdout))
    assert len(ran) >= 8, ran  # the README's curl lines and tsad commands, service/README's
    outputs = {c.split()[0].rsplit("/", 1)[-1] + " " + c.split()[1]: out
               for _, c, out in ran}
    # the README's demo ends as the README shows it: one anomaly, one alert
    demo = outputs["tsad demo"].strip().splitlines()
    summary = json.loads(demo[-1])
    assert (summary["points"], summary["scored"], summary["anomalies"], summary["alerts"]) == (
        480, 160, 1, 1), demo
    assert re.search(r"anomaly at \S+: score [\d.]+ >=? threshold [\d.]+$", demo[1]), demo
    assert re.search(r" x threshold [\d.]+ at ", demo[2]), demo


@pytest.mark.slow
def test_the_readme_receiver_gets_signed_events(service, tmp_path):
    """`tsad receive --subscribe http://127.0.0.1:8000`, as the README writes it (on a free
    port of its own), logs an alert's events with a good signature."""
    proc, _ = service
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"`(tsad receive --subscribe http://127\.0\.0\.1:8000[^`]*)`",
                        readme).group(1)
    port = free_port()
    receiver = subprocess.Popen(
        [*shlex.split(as_run_here(command, proc.url)), "--port", str(port)],
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while receiver.poll() is None and not _subscribed(port):
            if time.monotonic() > deadline:
                receiver.terminate()
                break
            time.sleep(0.1)
        assert receiver.poll() is None, receiver.communicate()[0]
        now = time.time() - 600 * 60
        points = [{"timestamp": now + 60 * i, "values": [50.0 if i == 560 else
                                                         float(i % 7)]} for i in range(600)]
        r = httpx.post(f"{proc.url}/score", json={"stream": "readme-receiver",
                                                    "points": points}, timeout=60)
        assert r.status_code == 200 and any(p["anomaly"] for p in r.json()["results"])
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(receiver.stdout), daemon=True).start()
        wait_for(lambda: any("signature ok" in x for x in lines), timeout=60)
        assert any("alert.opened stream=readme-receiver" in x and "signature ok" in x
                   for x in lines), lines
    finally:
        receiver.terminate()
        receiver.wait(timeout=15)


def _subscribed(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 204
    except httpx.HTTPError:
        return False


def test_the_examples_are_read_as_the_shell_reads_them():
    assert commands("README.md")[:2] == [
        "make serve   # builds .venv, serves 127.0.0.1:8000 (PORT=...) without API keys; "
        "in-memory store unless REDIS_URL is set", "make test    # the same set-up plus dev "
        "extras, redis-server and promtool, then ruff and every test"]
    score = next(c for c in commands("README.md") if "/score" in c)
    assert score.startswith("curl -s -X POST") and score.endswith("[0.44]}]}'")
    assert as_run_here("curl -s localhost:8000/alerts", "http://127.0.0.1:9") == (
        "curl --fail-with-body -s 127.0.0.1:9/alerts")
