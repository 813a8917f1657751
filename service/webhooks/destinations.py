"""Where webhooks may POST: public unicast addresses, plus what the allow-list names.

A subscription URL is checked when it is created (422 on body.url), and every delivery's
TCP connection is checked again, on the addresses it is about to connect to
(``GuardedTransport``): a name that resolved to a public address at subscription time and
to 127.0.0.1 or 169.254.169.254 later (DNS rebinding) is refused at connect time, and the
connection goes to the very address that was checked. Redirects are never followed (the
worker's client), so a public target cannot bounce a delivery inside either.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOSTNAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-_")


class DestinationRefused(httpcore.ConnectError):
    """The destination is not a public address and not allow-listed. (A ConnectError, so
    httpx reports it like any connection failure; the worker tells it apart by cause.)"""


def _embedded(addr: IPAddress) -> Iterable[IPAddress]:
    """The address and the IPv4 addresses an IPv6 one carries (mapped, 6to4, Teredo)."""
    yield addr
    if isinstance(addr, ipaddress.IPv6Address):
        yield from (a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None)
        if addr.teredo:
            yield from addr.teredo


def is_public(addr: IPAddress) -> bool:
    """Global unicast only: no loopback, private, link-local, shared, reserved, unspecified
    or multicast address (Python counts some multicast ranges as global).

    >>> [is_public(ipaddress.ip_address(a)) for a in
    ...  ("93.184.215.14", "169.254.169.254", "10.0.0.1", "::1", "0.0.0.0", "224.0.0.1",
    ...   "::ffff:127.0.0.1", "100.64.0.1", "2606:4700::1111")]
    [True, False, False, False, False, False, False, False, True]
    """
    return all(a.is_global and not a.is_multicast for a in _embedded(addr))


@dataclass(frozen=True)
class AllowList:
    """Host names (exact, case-insensitive) and IP networks webhooks may reach even though
    they are not public (settings.webhook_allow_hosts)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = field(default_factory=tuple)

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
    refused = [a for a in addrs if not allow.allows_address(a)]
    if refused or not addrs:
        shown = ", ".join(str(a) for a in refused[:3])
        raise DestinationRefused(
            f"host {host!r} resolves to {shown or 'nothing'}: loopback, private, "
            "link-local, reserved and multicast addresses are refused unless "
            "TSAD_WEBHOOK_ALLOW_HOSTS names them")
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
