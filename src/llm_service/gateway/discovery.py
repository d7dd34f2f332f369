"""Replicas found by DNS: a name (a Kubernetes headless Service) whose addresses are the
replicas, resolved again and again so that the gateway follows replicas coming and going.

By default names are resolved like any other program's (``getaddrinfo``: /etc/hosts, then
the system's DNS servers); ``--dns-server HOST:PORT`` asks one DNS server directly instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import dns.asyncresolver
import dns.exception
import dns.resolver

from llm_service.settings import split_host_port

__all__ = ["DiscoveryError", "Resolver"]

logger = logging.getLogger(__name__)


class DiscoveryError(Exception):
    """A name could not be resolved this time (a timeout, a server failure)."""


def target(ip: str, port: int) -> str:
    """The gRPC target of an address: ``IP:PORT``, ``[IPv6]:PORT``."""
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


class Resolver:
    """Resolves a name to the set of its addresses.

    ``resolve`` returns an empty set when the name does not exist or has no address (a headless
    Service with no ready replica), and raises DiscoveryError when the answer is unknown (the
    caller then keeps what it had).
    """

    def __init__(self, dns_server: str | None = None, timeout: float = 2.0) -> None:
        self._timeout = timeout
        self._dns: dns.asyncresolver.Resolver | None = None
        if dns_server is not None:
            host, port = split_host_port(dns_server)
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = [host]
            self._dns.port = port
            self._dns.lifetime = timeout

    async def resolve(self, name: str) -> set[str]:
        if self._dns is None:
            return await self._getaddrinfo(name)
        addresses: set[str] = set()
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._dns.resolve(name, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                raise DiscoveryError(f"{name}: {exc}") from None
            addresses.update(r.to_text() for r in answer)
        return addresses

    async def _getaddrinfo(self, name: str) -> set[str]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise DiscoveryError(f"{name}: no answer within {self._timeout:g} s") from None
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                return set()
            raise DiscoveryError(f"{name}: {exc.strerror}") from None
        return {str(info[4][0]) for info in infos}
