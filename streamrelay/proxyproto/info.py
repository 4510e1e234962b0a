"""
What a PROXY protocol header says about the connection it precedes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "Command",
    "ProxyInfo",
    "Transport",
    "canonical_host",
]

#: TLV types from section 2.2 of the spec that this package gives meaning to.
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05

Command = Literal["PROXY", "LOCAL", "UNKNOWN"]
Transport = Literal["TCP", "UDP", "UNSPEC"]


def canonical_host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """
    Format an address the one way L{ProxyInfo} hosts are written, so they can
    be compared as strings: IPv6 compressed and lowercase, IPv4-mapped IPv6
    as C{::ffff:a.b.c.d} (RFC 5952 section 5; L{ipaddress} only does that
    itself from Python 3.13 on).
    """
    mapped = getattr(address, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else str(address)


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """
    A parsed PROXY protocol header.

    @ivar version: 1 (text) or 2 (binary).
    @ivar command: C{"PROXY"} when C{source} and C{destination} describe the
        original connection; C{"LOCAL"} (v2) or C{"UNKNOWN"} (v1) when the
        proxy opened the connection itself, e.g. for a health check, and the
        real socket endpoints must be used.  A v2 C{"PROXY"} header with the
        AF_UNSPEC family also carries no addresses; callers should treat any
        header with C{source is None} like C{"LOCAL"}.
    @ivar transport: C{"TCP"}, C{"UDP"} or C{"UNSPEC"} (no addresses).
    @ivar source: C{(host, port)} of the original client, the host in the
        form of L{canonical_host}, or L{None} when the header carries no
        addresses.
    @ivar destination: the same for the address the client connected to.
    @ivar tlvs: the v2 type-length-value extensions as C{(type, value)}, in
        header order and including CRC32C and NOOP; always empty for v1.
    """

    version: int
    command: Command
    transport: Transport
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def family(self) -> int | None:
        """
        The IP version of the addresses: 4, 6, or L{None} without addresses.
        Both addresses always share it, so looking at the source is enough.
        """
        if self.source is None:
            return None
        return 6 if ":" in self.source[0] else 4

    @property
    def unique_id(self) -> bytes | None:
        """
        The PP2_TYPE_UNIQUE_ID value the upstream proxy assigned to the
        connection, for correlating logs across proxy layers.
        """
        for kind, value in self.tlvs:
            if kind == PP2_TYPE_UNIQUE_ID:
                return value
        return None
