"""Where webhooks may POST: public unicast addresses, plus what the allow-list names.

A subscription URL is checked when it is created (422 on body.url), and every delivery's
TCP connection is checked again, on the addresses it is about to connect to
(``GuardedTransport``): a name that resolved to a public address at subscription time and
to 127.0.0.1 or 169.254.169.254 later (DNS rebinding) is refused at connect time, and the
connection goes to the very address that was checked. Redirects are never followed (the
worker's client), so a public target cannot bounce a delivery inside either.

"Public" is decided here, from the IANA special-purpose registries, not from Python's
``is_global`` alone (which differs between Python versions and, before 3.13, calls
``fec0::1``, ``::127.0.0.1`` and ``64:ff9b::a9fe:a9fe`` global):

- IPv4: not in any special-purpose block (``_V4_REFUSED``) and not multicast;
- IPv6 that carries an IPv4 address meant to be reached: IPv4-mapped ``::ffff:0:0/96``,
  IPv4-translated ``::ffff:0:0:0/96`` and NAT64 ``64:ff9b::/96`` are judged by that IPv4
  address (a NAT64 gateway forwards to it);
- IPv6 forms refused whatever they embed: IPv4-compatible ``::/96`` (deprecated), local-use
  NAT64 ``64:ff9b:1::/48`` (no fixed place for the IPv4 part), 6to4 ``2002::/16`` and
  Teredo ``2001::/32`` (they tunnel to the IPv4 they embed; nobody serves webhooks there);
- other IPv6: global unicast ``2000::/3`` only, outside its special blocks
  (``_V6_REFUSED``): so never ULA ``fc00::/7``, link-local ``fe80::/10``, site-local
  ``fec0::/10``, multicast, loopback or unspecified.

A NAT64 gateway with its own (network-specific) prefix cannot be told from a public IPv6
address: behind one, an egress firewall is the guard.

Loopback receivers (``tsad receive`` beside ``make serve``) are reachable on an open
service bound to loopback only (``local_receivers``): see ``AllowList.for_settings``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpcore
import httpx

from service.auth.guard import is_loopback

if TYPE_CHECKING:
    from service.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOSTNAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_net = ipaddress.ip_network
# IANA IPv4 special-purpose blocks, multicast and reserved (RFC 6890 and successors)
_V4_REFUSED = tuple(_net(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4"))
_V6_GLOBAL_UNICAST = _net("2000::/3")
# inside 2000::/3: IETF protocol assignments (Teredo, ORCHID, benchmarking, ...) 2001::/23,
# 6to4, documentation (two blocks)
_V6_REFUSED = tuple(_net(n) for n in ("2001::/23", "2002::/16", "2001:db8::/32", "3fff::/20"))
# the forms whose embedded IPv4 address (the low 32 bits) is the real destination
_V4_CARRIERS = tuple(_net(n) for n in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"))


class DestinationRefused(httpcore.ConnectError):
    """The destination is not a public address and not allow-listed. (A ConnectError, so
    httpx reports it like any connection failure; the worker tells it apart by cause.)"""


def is_public(addr: IPAddress) -> bool:
    """Global unicast only, judged as the module docstring says.

    >>> [is_public(ipaddress.ip_address(a)) for a in
    ...  ("93.184.215.14", "169.254.169.254", "10.0.0.1", "::1", "0.0.0.0", "224.0.0.1",
    ...   "::ffff:127.0.0.1", "100.64.0.1", "2606:4700::1111", "64:ff9b::a9fe:a9fe",
    ...   "64:ff9b::5db8:d70e", "::127.0.0.1", "fec0::1", "2002:5db8:d70e::1")]
    [True, False, False, False, False, False, False, False, True, False, True, False, False, False]
    """
    if isinstance(addr, ipaddress.IPv4Address):
        return (addr.is_global and not addr.is_multicast
                and not any(addr in net for net in _V4_REFUSED))
    if any(addr in net for net in _V4_CARRIERS):
        return is_public(ipaddress.IPv4Address(int(addr) & 0xFFFF_FFFF))
    return (addr in _V6_GLOBAL_UNICAST and addr.is_global
            and not any(addr in net for net in _V6_REFUSED))


def names_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (127.0.0.0/8, ::1): a host that says it is
    this machine, as opposed to a name that happens to resolve here.

    >>> [names_loopback(h) for h in ("localhost", "LOCALHOST.", "127.0.0.2", "::1",
    ...                                "::ffff:127.0.0.1", "loopback.example.com")]
    [True, True, True, True, False, False]
    """
    return host.lower().rstrip(".") == "localhost" or is_loopback(host)


@dataclass(frozen=True)
class AllowList:
    """Host names (exact, case-insensitive) and IP networks webhooks may reach even though
    they are not public (settings.webhook_allow_hosts)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = field(default_factory=tuple)
    # loopback addresses of hosts that name loopback (localhost, 127.0.0.1, ::1), never
    # of other names (DNS rebinding): on for an open service on loopback (for_settings)
    local_receivers: bool = False

    @classmethod
    def for_settings(cls, settings: Settings, client: str | None = None) -> AllowList:
        """The service's allow-list: TSAD_WEBHOOK_ALLOW_HOSTS, plus loopback receivers
        when the service runs open (TSAD_AUTH=open) on a loopback address (make serve):
        there every caller is already on this machine, unauthenticated, and reaches its
        loopback ports directly, so a webhook to them grants nothing new. A keyed service,
        or one open on another address (TSAD_ALLOW_OPEN), gets no such exception. At
        subscription, ``client`` (the caller's address) must be loopback too, in case the
        process was bound elsewhere by hand (uvicorn --host) with TSAD_HOST left at its
        default.

        >>> from service.settings import Settings
        >>> AllowList.for_settings(Settings()).local_receivers
        True
        >>> [AllowList.for_settings(s, c).local_receivers for s, c in (
        ...     (Settings(), "10.0.0.7"), (Settings(auth="keys"), "127.0.0.1"),
        ...     (Settings(host="0.0.0.0", allow_open=True), "127.0.0.1"))]
        [False, False, False]
        """
        local = (settings.auth == "open" and is_loopback(settings.host)
                 and (client is None or is_loopback(client)))
        return replace(cls.parse(settings.webhook_allow_hosts), local_receivers=local)

    @classmethod
    def parse(cls, spec: str) -> AllowList:
        """'receiver, 127.0.0.1, 10.0.0.0/8, ::1'

        >>> AllowList.parse("Receiver, 10.0.0.0/8").allows_host("receiver")
        True
        >>> AllowList.parse("10.0.0.0/8").allows_address(ipaddress.ip_address("10.1.2.3"))
        True
        """
        hosts, networks = set(), []
        for entry in (e.strip() for e in spec.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                name = entry.lower().rstrip(".")
                if not name or "/" in entry or not set(name) <= _HOSTNAME_CHARS:
                    raise ValueError(f"webhook allow-list entry {entry!r} is neither a host "
                                     "name nor an IP network") from None
                hosts.add(name)
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, addr: IPAddress) -> bool:
        return is_public(addr) or any(addr in net for net in self.networks
                                      if net.version == addr.version)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror included
        raise DestinationRefused(f"host {host!r} does not resolve") from exc
    # scope ids (fe80::1%eth0) are cut: the address decides, not the interface
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0])
                              for info in infos))


async def checked_addresses(host: str, port: int, allow: AllowList) -> list[IPAddress]:
    """The addresses of ``host`` a webhook may connect to; DestinationRefused when any of
    them is refused (a name that also resolves inside is refused as a whole)."""
    addrs = await resolve(host, port)
    local = allow.local_receivers and names_loopback(host)
    refused = [a for a in addrs
               if not (allow.allows_address(a) or (local and a.is_loopback))]
    if refused or not addrs:
        shown = ", ".join(str(a) for a in refused[:3])
        raise DestinationRefused(
            f"host {host!r} resolves to {shown or 'nothing'}: loopback, private, "
            "link-local, reserved and multicast addresses, and IPv6 addresses that embed "
            "one (IPv4-mapped, -compatible or -translated, NAT64, 6to4, Teredo), are "
            "refused unless TSAD_WEBHOOK_ALLOW_HOSTS names them")
    return addrs


async def check_url(url: str, allow: AllowList) -> None:
    """Raises DestinationRefused unless ``url``'s host may receive webhooks."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if allow.allows_host(host):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    await checked_addresses(host, port, allow)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks, then connects to the checked address itself (TLS still verifies
    the certificate against the URL's host name: httpcore passes it as server_hostname)."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable | None = None) -> httpcore.AsyncNetworkStream:
        if self.allow.allows_host(host):
            targets: list[str] = [host]
        else:
            targets = [str(a) for a in await checked_addresses(host, port, self.allow)]
        error: httpcore.ConnectError | None = None
        for target in targets:  # like a browser: the next address when one fails
            try:
                return await self.inner.connect_tcp(target, port, timeout, local_address,
                                                    socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or DestinationRefused(f"host {host!r} has no address")

    async def connect_unix_socket(self, *args: object, **kwargs: object) -> None:
        raise DestinationRefused("webhooks never connect to Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport with every TCP connect going through the destination check."""

    def __init__(self, allow: AllowList) -> None:
        super().__init__()
        self._pool = httpcore.AsyncConnectionPool(ssl_context=httpx.create_ssl_context(),
                                                  network_backend=_GuardedBackend(allow))
