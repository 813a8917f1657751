"""The second step of a newcomer: the client commands without a service, `make serve` on a
terminal (readable logs, a quiet Ctrl-C), the service stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import httpx
import pytest

from service.process import free_port
from tests.conftest import DATA_DIR

ROOT = DATA_DIR.parents[1]


def tsad(*args: str, cwd: object = ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_clients_without_a_service_say_what_to_do_in_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    procs = [tsad("demo", "--url", url, cwd=tmp_path),
             tsad("replay", str(DATA_DIR / "nab" / "nyc_taxi.csv"), "--stream", "x",
                  "--url", url),
             tsad("receive", "--port", str(free_port()), "--subscribe", url, "--wait", "0")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in err, (out, err)
        (line,) = err.splitlines()
        assert line.startswith(f"no tsad service answers at {url} ("), line
        assert "`make serve`" in line and ("--url" in line or "--subscribe" in line), line
    assert not (tmp_path / "runs").exists()  # demo asks before writing its file
    for command in ("demo", "replay"):
        help_ = tsad(command, "--help").communicate(timeout=60)[0]
        assert "(default http://127.0.0.1:8000)" in " ".join(help_.split()), help_


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    out, deadline = b"", time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                out += os.read(fd, 65536)
            except OSError:  # the terminal closed: the process group is gone
                break
    return out


@pytest.mark.slow
def test_make_serve_on_a_terminal_logs_lines_and_stops_quietly_on_ctrl_c():
    port = free_port()
    pid, fd = pty.fork()
    if pid == 0:  # the child: `make serve` in a terminal of its own
        os.chdir(ROOT)
        os.execvp("make", ["make", "serve", f"PORT={port}"])
    try:
        started = read_until(fd, b"Application startup complete", 120)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        os.write(fd, b"\x03")  # Ctrl-C, as a person types it: SIGINT to the foreground group
        stopped = read_until(fd, b"\x00never", 30)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = (started + stopped).decode(errors="replace")
    assert "INFO tsad.service: store ready backend=memory" in text, text
    assert '{"ts"' not in text and "\x1b[" not in text, text  # no JSON, no raw colour codes
    assert "Finished server process" in text
    assert "make: ***" not in text and "Traceback" not in text, text
    assert os.WIFEXITED(status) or os.WTERMSIG(status) == signal.SIGINT


@pytest.mark.slow
def test_serve_stopped_by_sigterm_exits_0_with_json_logs_off_a_terminal():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    records = [json.loads(line) for line in out.splitlines()]
    assert records and all("color_message" not in r for r in records), out
    assert records[-1]["msg"].startswith("Finished server process")
