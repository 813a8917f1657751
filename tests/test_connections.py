"""Slow and oversized request heads on a real service process, over real sockets: a head
must arrive within TSAD_HEADER_TIMEOUT_SECONDS of its first byte (or of the connection
opening), else 408 and the connection closes; a head over TSAD_MAX_HEADER_BYTES is a 431.
Nothing else changes: requests sent in pieces, large bodies and pipelined requests work."""

from __future__ import annotations

import json
import os
import socket
import time

import httpx
import pytest

from service.process import ServiceProcess
from tests.conftest import wait_for
from tests.test_alerts import spiky

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def service():
    env = {"TSAD_HEADER_TIMEOUT_SECONDS": str(TIMEOUT), "TSAD_KEEP_ALIVE_SECONDS": "2",
           "TSAD_MAX_HEADER_BYTES": "8192"}
    with ServiceProcess(env) as svc:
        httpx.post(f"{svc.url}/score", json={"stream": "warm", "points": spiky(20, [])})
        yield svc


def open_fds(svc: ServiceProcess) -> int:
    return len(os.listdir(f"/proc/{svc.proc.pid}/fd"))


def rss_kb(svc: ServiceProcess) -> int:
    with open(f"/proc/{svc.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length, read whole."""
    out = b""
    while b"\r\n\r\n" not in out:
        out += sock.recv(65536)
    head, _, body = out.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


HEAD = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
STALLS = [b"", b"GE", b"GET /healthz HTTP/1.1\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1",
          HEAD + b"Content-Length: 10\r\n\r"]


@pytest.mark.slow
def test_stalled_heads_are_closed_at_the_deadline_while_others_are_served(service):
    baseline = open_fds(service)
    socks, start = [], time.monotonic()
    for i in range(200):  # 200 slow clients, each stalls at some point of its head
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        sock.sendall(STALLS[i % len(STALLS)])
        socks.append(sock)
    opened = time.monotonic()
    wait_for(lambda: open_fds(service) >= baseline + 190, timeout=TIMEOUT / 2)  # held, for now
    # meanwhile the service answers as usual
    r = httpx.post(f"{service.url}/score", json={"stream": "s", "points": spiky(20, [])},
                   timeout=5)
    assert r.status_code == 200, r.text
    assert time.monotonic() - opened < TIMEOUT  # served before the stalled ones expired
    for sock in socks:
        out = read_all(sock)  # returns at EOF: the server closed it
        assert out.startswith(b"HTTP/1.1 408 "), out[:100]
        assert b"TSAD_HEADER_TIMEOUT_SECONDS" in out
        sock.close()
    assert time.monotonic() - start > TIMEOUT * 0.8 and time.monotonic() - opened < TIMEOUT + 3
    deadline = time.monotonic() + 5
    while open_fds(service) > baseline + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(service) <= baseline + 5  # and let go of them
    assert httpx.get(f"{service.url}/healthz").status_code == 200


@pytest.mark.slow
def test_a_head_trickled_byte_by_byte_is_cut_at_the_deadline(service):
    # slowloris: never idle, so an idle timeout never fires; the head deadline does
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        start = time.monotonic()
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:  # reset once the server has closed: expected
            pass
        out = read_all(sock)
        assert out.startswith(b"HTTP/1.1 408 "), out[:100]
        assert TIMEOUT * 0.8 < time.monotonic() - start < TIMEOUT + 2


@pytest.mark.slow
def test_an_idle_keep_alive_connection_then_a_stalled_head_is_closed(service):
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        # a complete request, then half of the next one (pipelined in the same packet)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
        start = time.monotonic()
        out = read_all(sock)
    first, _, rest = out.partition(b"HTTP/1.1 408 ")
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b'{"status":"ok"}'), out
    assert rest and TIMEOUT * 0.8 < time.monotonic() - start < TIMEOUT + 2


@pytest.mark.slow
def test_an_oversized_head_is_431_and_closed(service):
    before = rss_kb(service)
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
        try:
            for _ in range(200):  # 13 MB of one header value, if anyone kept reading
                sock.sendall(b"a" * 65536)
        except OSError:
            pass
        out = read_all(sock)
    assert out.startswith(b"HTTP/1.1 431 "), out[:100]
    assert b"TSAD_MAX_HEADER_BYTES" in out
    assert rss_kb(service) < before + 8192  # it stopped reading: not the 13 MB sent


@pytest.mark.slow
def test_heads_in_pieces_and_bodies_larger_than_the_head_cap_are_served(service):
    body = json.dumps({"stream": "big", "points": spiky(400, [])}).encode()
    assert len(body) > 8192 * 2  # a body is not a head: TSAD_MAX_HEADER_BYTES is 8192
    head = HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(head + body)  # head and body in one write
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        # the next request on the same connection, its head in pieces that split the
        # blank line, within the deadline
        for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n\r", b"\n"):
            sock.sendall(piece)
            time.sleep(TIMEOUT / 5)
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
