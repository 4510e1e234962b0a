"""
Socket addresses as the relay writes and compares them, in one place: the
C{host:port} text of every log line, the IPv4 form of a v4-mapped IPv6
host, and how much a client may send before its target is there to take it.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Protocol

__all__ = ["HOLD_LIMIT", "RUN_ID", "HostPort", "describe", "join_host_port", "unmapped"]

#: Bytes held from a client while its target is being reached, before
#: reading from it pauses (TCP) or its datagrams are dropped (UDP): Twisted's
#: own read size and write-buffer threshold.
HOLD_LIMIT = 65536

#: Starts every PROXY v2 unique id (TCP pairs and UDP sessions), so ids
#: differ across relay restarts and processes.
RUN_ID = os.urandom(4).hex()


def join_host_port(host: str, port: int) -> str:
    """C{host:port}, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HostPort(Protocol):
    """A socket address: Twisted's IPv4Address and IPv6Address are ones."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def describe(address: HostPort) -> str:
    """C{host:port} of a Twisted IPv4Address or IPv6Address."""
    return join_host_port(address.host, address.port)


def unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """
    The address of C{host}, with C{::ffff:a.b.c.d} (an IPv4 client of a
    dual-stack socket) turned into C{a.b.c.d} and any C{%zone} dropped, so
    that rules written for IPv4 apply to it.
    """
    address = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
