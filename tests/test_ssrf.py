"""SSRF, table-driven: every URL form below that names, encodes, embeds, maps or translates
to a non-public address is refused at subscription (422 on body.url, a keyed service) and
at connect time (the delivery transport, on the URL as the service stores it), and nothing
reaches the loopback listener the forms point at. Public forms pass both. Then the one
exception: loopback receivers on an open service bound to loopback (`make serve`).

The forms: the audit's 66 (decimal, octal, hex and short IPv4, userinfo and delimiter
tricks, Unicode and percent-encoded hosts, DNS names of internal addresses, schemes other
than http(s)) and the IPv6 forms that carry IPv4 (mapped, compatible, translated, NAT64,
6to4, Teredo) or are local (site-local, ULA, link-local). Redirects are never followed
and rebinding is checked per connection: tests/test_webhook_destinations.py.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from service.app import create_app
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.webhooks.destinations import (
    AllowList,
    DestinationRefused,
    GuardedTransport,
    checked_addresses,
)
from service.webhooks.schemas import WebhookIn
from tests.test_webhook_destinations import Target, deliver_once

ADMIN = "ssrf-admin-key-" + "k" * 32
P = "{port}"  # the loopback listener's port, filled in by the fixture

REFUSED = [
    # IPv4 loopback, every spelling a URL parser or inet_aton accepts
    f"http://127.0.0.1:{P}/", f"https://127.0.0.1:{P}/", f"http://127.1:{P}/",
    f"http://127.0.1:{P}/", f"http://2130706433:{P}/", f"http://0x7f000001:{P}/",
    f"http://0x7f.0x0.0x0.0x1:{P}/", f"http://0x7f.1:{P}/", f"http://0177.0.0.1:{P}/",
    f"http://017700000001:{P}/", f"http://0177.1:{P}/", f"http://127.000.000.001:{P}/",
    f"http://127.0.0.255:{P}/", f"http://127.255.255.254:{P}/",
    "http://127.0.0.1:6379/",  # Redis
    # the unspecified address (Linux connects it to loopback)
    f"http://0:{P}/", f"http://0.0.0.0:{P}/", f"http://0x0:{P}/", f"http://[::]:{P}/",
    # names of loopback, and names that public DNS points inside (refused offline too:
    # a name that does not resolve is refused)
    f"http://localhost:{P}/", f"http://LOCALHOST:{P}/", f"http://localhost.:{P}/",
    f"http://ip6-localhost:{P}/", f"http://localtest.me:{P}/",
    f"http://127.0.0.1.nip.io:{P}/", "http://169.254.169.254.nip.io/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://instance-data/latest/meta-data/",
    # Unicode and percent-encoded hosts (URL parsers map them to ASCII)
    f"http://%31%32%37.0.0.1:{P}/", f"http://127\u30020\u30020\u30021:{P}/",
    f"http://\u2460\u2461\u2466.\u24ea.\u24ea.\u2460:{P}/", f"http://\u24db\u24de\u24d2\u24d0"
    f"\u24db\u24d7\u24de\u24e2\u24e3:{P}/",
    # userinfo and delimiter tricks: the host is the internal one
    f"http://user:pass@127.0.0.1:{P}/", f"http://93.184.215.14@127.0.0.1:{P}/",
    f"http://example.com@127.0.0.1:{P}/", f"http://127.0.0.1:{P}#@93.184.215.14/",
    f"http://127.0.0.1:{P}?@93.184.215.14/", f"http://127.0.0.1:{P}\\@93.184.215.14/",
    f"http://127.0.0.1:{P}/@93.184.215.14/",
    # cloud metadata
    "http://169.254.169.254/latest/meta-data/", "http://2852039166/", "http://0xa9fea9fe/",
    "http://0251.0376.0251.0376/", "http://169.254.43518/", "http://0xa9.0xfe.0xa9.0xfe/",
    "http://[fd00:ec2::254]/latest/meta-data/", "http://100.100.100.200/latest/meta-data/",
    # private, shared, reserved, documentation, benchmarking, multicast, broadcast
    "http://10.0.0.1/", "http://10.255.255.255/", "http://172.16.0.1/",
    "http://172.31.255.255/", "http://192.168.0.1/", "http://192.168.1.1:8080/admin",
    "http://100.64.0.1/", "http://192.0.0.1/", "http://192.0.2.1/", "http://198.18.0.1/",
    "http://198.51.100.1/", "http://203.0.113.1/", "http://192.88.99.1/",
    "http://224.0.0.1/", "http://239.255.255.250/", "http://240.0.0.1/",
    "http://255.255.255.255/",
    # IPv6 loopback
    f"http://[::1]:{P}/", f"http://[0:0:0:0:0:0:0:1]:{P}/",
    # IPv4-mapped ::ffff:0:0/96
    f"http://[::ffff:127.0.0.1]:{P}/", f"http://[::ffff:7f00:1]:{P}/",
    f"http://[0:0:0:0:0:ffff:127.0.0.1]:{P}/", "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/", "http://[::ffff:10.0.0.1]/", "http://[::ffff:192.168.0.1]/",
    # IPv4-compatible ::/96 (deprecated; refused whatever it embeds)
    f"http://[::127.0.0.1]:{P}/", f"http://[::7f00:1]:{P}/", "http://[::a9fe:a9fe]/",
    "http://[::93.184.215.14]/",
    # IPv4-translated ::ffff:0:0:0/96
    f"http://[::ffff:0:7f00:1]:{P}/", f"http://[::ffff:0:127.0.0.1]:{P}/",
    "http://[::ffff:0:a9fe:a9fe]/",
    # NAT64: the well-known prefix judged by what it embeds; local-use prefix refused
    f"http://[64:ff9b::7f00:1]:{P}/", "http://[64:ff9b::a9fe:a9fe]/",
    "http://[64:ff9b::10.0.0.1]/", "http://[64:ff9b::192.168.0.1]/",
    "http://[64:ff9b:1::a9fe:a9fe]/", "http://[64:ff9b:1::5db8:d70e]/",
    # 6to4 2002::/16 and Teredo 2001::/32 (refused whatever they embed)
    "http://[2002:7f00:1::1]/", "http://[2002:a9fe:a9fe::]/", "http://[2002:c0a8:101::1]/",
    "http://[2002:5db8:d70e::1]/", "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
    "http://[2001::1]/",
    # site-local, ULA, link-local, multicast, discard, documentation
    "http://[fec0::1]/", "http://[feff::1]/", "http://[fc00::1]/", "http://[fd12:3456::1]/",
    "http://[fe80::1]/", "http://[fe80::a9fe:a9fe]/", "http://[ff02::1]/",
    "http://[ff0e::1]/", "http://[100::1]/", "http://[2001:db8::1]/", "http://[3fff::1]/",
    # schemes other than http(s) (refused by validation, before any address check)
    "gopher://127.0.0.1:6379/_INFO", "file:///etc/passwd", "dict://127.0.0.1:6379/info",
    "ftp://127.0.0.1/", "ldap://127.0.0.1/",
]
PUBLIC = [
    "http://93.184.215.14/hook", "https://1.1.1.1/hook", "http://[2606:4700:4700::1111]/hook",
    "http://[2a00:1450:4001:82b::200e]/hook",
    "http://[::ffff:93.184.215.14]/hook",  # mapped: judged by the IPv4 it carries
    "http://[64:ff9b::93.184.215.14]/hook",  # NAT64 of a public address: how IPv6-only
    "http://user:pass@93.184.215.14/hook",  # networks reach IPv4 services
]


def keyed_client(**settings) -> TestClient:
    app = create_app(Settings(auth="keys", admin_key=ADMIN, **settings),
                     ServiceMetrics(CollectorRegistry()))
    return TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"},
                      client=("127.0.0.1", 50000))


@pytest.fixture(scope="module")
def listener():
    """A loopback HTTP server the refused forms point at: nothing may reach it."""
    target = Target(200)
    yield target
    target.close()
    assert target.requests == [], target.requests


@pytest.fixture(scope="module")
def keyed():
    with keyed_client() as client:
        yield client


def refused_at_connect(url: str, allow: AllowList) -> bool:
    """Whether the delivery transport refuses ``url`` (as the service stores it) before
    connecting; False when it lets the connection go ahead (whatever comes of it)."""
    async def attempt() -> bool:
        async with httpx.AsyncClient(transport=GuardedTransport(allow), timeout=2,
                                     follow_redirects=False, trust_env=False) as http:
            try:
                await http.post(url, content=b"{}")
            except httpx.ConnectError as exc:
                return isinstance(exc.__cause__, DestinationRefused)
            except httpx.HTTPError:
                return False
            return False
    return asyncio.run(attempt())


def stored_form(url: str) -> str | None:
    """The URL as a subscription stores it; None when it is not a valid webhook URL."""
    try:
        return str(WebhookIn(url=url).url)
    except ValidationError:
        return None


def test_the_table_has_every_form_the_audit_tried():
    assert len(REFUSED) >= 66 + 20 and len(set(REFUSED)) == len(REFUSED)


@pytest.mark.parametrize("form", REFUSED)
def test_internal_forms_are_refused_at_subscription_and_at_connect(form, keyed, listener):
    url = form.format(port=listener.port)
    r = keyed.post("/webhooks", json={"url": url})
    assert r.status_code == 422, (url, r.text)
    assert r.json()["detail"][0]["loc"][:2] == ["body", "url"], r.text
    stored = stored_form(url)
    if stored is not None:  # a valid URL: the connection is refused too
        assert refused_at_connect(stored, AllowList()), stored
    assert listener.requests == []


@pytest.mark.parametrize("url", PUBLIC)
def test_public_forms_pass_both_checks(url, keyed):
    r = keyed.post("/webhooks", json={"url": url})
    assert r.status_code == 201, (url, r.text)
    # the connect-time check itself (no packet sent to the public address)
    host = httpx.URL(str(WebhookIn(url=url).url)).host
    assert asyncio.run(checked_addresses(host, 80, AllowList()))
    assert keyed.delete(f"/webhooks/{r.json()['id']}").status_code == 204


# --- loopback receivers on an open loopback service (issue 28 item 1) --------------------
def loopback_aliases() -> list[str]:
    """This machine's host name when it resolves to loopback (Debian's /etc/hosts makes it
    127.0.1.1): a name that is not 'localhost' yet lands there, like a rebinding name."""
    name = socket.gethostname()
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        return []
    return [name] if addrs and all(a.startswith("127.") or a == "::1" for a in addrs) else []


LOOPBACK_RECEIVERS = ["http://127.0.0.1:9000/hook", "http://localhost:9000/hook",
                      "http://[::1]:9000/hook", "http://127.0.0.2:9000/hook"]
# still refused there: internal addresses that are not this machine's loopback, loopback
# hidden in another form, and names that only happen to resolve to loopback (rebinding)
STILL_REFUSED = ["http://169.254.169.254/", "http://10.0.0.1/", "http://[fe80::1]/",
                 "http://[::ffff:127.0.0.1]:9000/", "http://[64:ff9b::7f00:1]:9000/",
                 *(f"http://{name}:9000/hook" for name in loopback_aliases())]


def open_client(client: str, **settings) -> TestClient:
    app = create_app(Settings(**settings), ServiceMetrics(CollectorRegistry()))
    return TestClient(app, client=(client, 50000))


def test_an_open_loopback_service_takes_loopback_receivers_from_loopback_callers():
    with open_client("127.0.0.1") as c:  # make serve: TSAD_AUTH=open on 127.0.0.1
        for url in LOOPBACK_RECEIVERS:
            assert c.post("/webhooks", json={"url": url}).status_code == 201, url
        for url in STILL_REFUSED:
            r = c.post("/webhooks", json={"url": url})
            assert r.status_code == 422, (url, r.text)


@pytest.mark.parametrize("client,settings", [
    ("127.0.0.1", {"auth": "keys", "admin_key": ADMIN}),  # a keyed service
    ("127.0.0.1", {"host": "0.0.0.0", "allow_open": True}),  # open beyond loopback
    ("10.0.0.7", {}),  # bound elsewhere by hand (uvicorn --host), a remote caller
])
def test_nowhere_else_are_loopback_receivers_taken(client, settings):
    with open_client(client, **settings) as c:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        for url in LOOPBACK_RECEIVERS:
            r = c.post("/webhooks", json={"url": url}, headers=headers)
            assert r.status_code == 422, (url, r.text)


def test_deliveries_reach_loopback_receivers_only_on_an_open_loopback_service():
    target = Target(200)
    try:
        for host in ("127.0.0.1", "localhost"):
            url = f"http://{host}:{target.port}/hook"
            assert deliver_once(url, "", auth="open") == {}
            dead = deliver_once(url, "", auth="keys")
            assert dead["last_error"].startswith("destination refused"), dead
        assert target.requests == ["/hook", "/hook"]
        # a name that is not loopback but resolves there (DNS rebinding) stays refused
        for name in loopback_aliases():
            dead = deliver_once(f"http://{name}:{target.port}/hook", "", auth="open")
            assert dead["last_error"].startswith("destination refused"), dead
        assert target.requests == ["/hook", "/hook"]
    finally:
        target.close()
