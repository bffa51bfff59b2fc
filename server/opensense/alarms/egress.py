"""What a tenant may make the server connect to, and what it may put in a mail header.

A webhook URL is a tenant's input that makes the server open a connection: unchecked,
it reaches 127.0.0.1, the LAN, a cloud metadata service (SSRF). So:

- `url_problem` / `email_problem` / `line_problem`: the syntax, checked when a
  recipient is saved and again before every send (rows stored before these checks
  existed may hold anything): a host is required, no control characters, no CR/LF in
  anything that ends up in a mail header.
- `resolve`: the host's addresses, every one checked (loopback, RFC 1918, link-local
  and metadata, CGNAT, ULA, multicast, reserved, and IPv6 forms embedding those are
  refused unless `OPENSENSE_WEBHOOK_ALLOW_PRIVATE`), at save and at every send.
- `PinnedResolver`: the connection then goes to exactly the checked addresses (the
  URL keeps its host name, so Host and TLS SNI and certificate checks are unchanged):
  a DNS answer that changes between the check and the connect (rebinding) is never
  asked for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

RESOLVE_TIMEOUT_S = 5.0
URL_MAX = 500
EMAIL_MAX = 254

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(Exception):
    """The target may not be reached; the message says why (shown to the tenant)."""


class Unresolved(Refused):
    """The host has no address now (DNS failing): maybe later, unlike a refused range."""


def _controls(s: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in s)


def line_problem(s: str, what: str) -> str | None:
    """A name shown in a mail subject or on a page: one line, no control characters."""
    if _controls(s):
        return f"{what} may not contain line breaks or control characters"
    return None


def _hostname_problem(host: str) -> str | None:
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or any(not 1 <= len(label) <= 63 for label in labels):
        return f"{host[:60]!r} is not a valid host name"
    try:
        host.encode("idna")
    except UnicodeError:
        return f"{host[:60]!r} is not a valid host name"
    return None


def _ip(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook target, or None."""
    if not url or len(url) > URL_MAX:
        return f"the URL must be 1..{URL_MAX} characters"
    if _controls(url) or any(c.isspace() for c in url):
        return "the URL may not contain spaces or control characters"
    try:
        u = URL(url)
    except (ValueError, TypeError):
        return "the URL cannot be parsed"
    if u.scheme not in ("http", "https"):
        return "the URL must start with https:// or http://"
    host = u.raw_host
    if not host:
        return "the URL needs a host"
    if _ip(host) is None:
        return _hostname_problem(host)
    return None


def email_problem(addr: str) -> str | None:
    """Why `addr` cannot be an email recipient, or None. Plain addr-spec only: no
    display name, no quoting, nothing a mail header would interpret."""
    if not addr or len(addr) > EMAIL_MAX:
        return f"the address must be 1..{EMAIL_MAX} characters"
    if _controls(addr) or any(c.isspace() or c in '<>()[],;:\\"' for c in addr):
        return 'the address may not contain spaces, line breaks or <>()[],;:\\"'
    local, at, domain = addr.rpartition("@")
    if not at or not local or "@" in local or not domain:
        return "the address must be name@domain"
    if _hostname_problem(domain):
        return "the address's domain is not a valid host name"
    return None


def ip_problem(ip: IP) -> str | None:
    """Why the server may not connect to `ip` (private ranges), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip.teredo:
            embedded = ip.teredo[1]
        if embedded is not None and ip_problem(embedded):
            return ip_problem(embedded)
    if not ip.is_global or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return (
            f"{ip} is a loopback, private, link-local or reserved address"
            " (set OPENSENSE_WEBHOOK_ALLOW_PRIVATE for on-premise receivers)"
        )
    return None


@dataclass(frozen=True)
class Address:
    family: int
    ip: str


async def resolve(host: str, port: int, allow_private: bool) -> list[Address]:
    """Every address of `host`, each checked; Refused if any is refused (an attacker's
    name may answer one public and one private address) or none resolves."""
    literal = _ip(host)
    if literal is not None:
        addrs = [Address(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
            )
        except (OSError, UnicodeError, TimeoutError) as exc:
            raise Unresolved(f"{host[:60]} does not resolve ({type(exc).__name__})") from None
        seen: dict[str, Address] = {}
        for family, _type, _proto, _canon, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                ip = str(sockaddr[0]).split("%", 1)[0]
                seen.setdefault(ip, Address(int(family), ip))
        addrs = list(seen.values())
        if not addrs:
            raise Unresolved(f"{host[:60]} has no address")
    if not allow_private:
        for a in addrs:
            why = ip_problem(ipaddress.ip_address(a.ip))
            if why:
                raise Refused(f"{host[:60]}: {why}")
    return addrs


class PinnedResolver(AbstractResolver):
    """Answers only for the one host it was made for, with the addresses checked."""

    def __init__(self, host: str, addrs: list[Address]) -> None:
        self.host = host
        self.addrs = addrs

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self.host:
            raise OSError(f"no pinned address for {host[:60]}")
        return [
            ResolveResult(
                hostname=host,
                host=a.ip,
                port=port,
                family=a.family,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in self.addrs
        ]

    async def close(self) -> None:
        return None
