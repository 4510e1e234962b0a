"""
The PROXY protocol on UDP routes, one datagram at a time.

Over UDP a v2 header travels in the same datagram as its payload (transport
DGRAM), so every datagram is judged alone: L{read_header} takes a header off
a datagram from a proxy, or says why the datagram must be dropped, and
L{session_header} builds the header a session puts in front of each datagram
it sends to its target.  Nothing here keeps state between datagrams.
"""

from __future__ import annotations

import ipaddress

from .config import ProxyProtocolConfig
from .proxyproto import (
    PP2_TYPE_UNIQUE_ID,
    V1_SIGNATURE,
    V2_SIGNATURE,
    InvalidProxyHeader,
    build_v2,
    parse,
    unify_families,
)

__all__ = ["MAX_UDP_PAYLOAD", "DatagramDropped", "read_header", "session_header"]

Address = tuple[str, int]

#: The largest UDP payload over IPv4: a datagram that would exceed it with
#: the outbound header is dropped, never truncated.
MAX_UDP_PAYLOAD = 65507


class DatagramDropped(Exception):
    """
    A datagram from a proxy peer that must not reach the target.  C{reason}
    is what the route's C{header_errors} count it as; C{str()} says why.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def read_header(settings: ProxyProtocolConfig, data: bytes, peer: Address) -> tuple[Address, Address | None, bytes]:
    """
    Judge one datagram from C{peer} under the route's inbound C{settings}:
    the real client, the address it wrote to (if the header says), and the
    payload.  A trusted peer must send a header in C{required} and C{mixed}
    mode and may in C{optional}; an untrusted one is dropped in C{required}
    and must not send one otherwise (a spoofing attempt).

    @raise DatagramDropped: with one of the reasons C{missing}, C{untrusted},
        C{v1}, C{truncated}, C{invalid}, C{stream} or C{local}.
    """
    signed = data.startswith(V2_SIGNATURE) or data.startswith(V1_SIGNATURE)
    if not settings.trusts(peer[0]):
        if settings.mode == "required":
            raise DatagramDropped("untrusted", "not a trusted proxy")
        if signed:
            raise DatagramDropped("untrusted", "PROXY header from an untrusted peer")
        return peer, None, data
    if not signed:
        if settings.mode == "optional":
            return peer, None, data
        raise DatagramDropped("missing", "no PROXY v2 header")
    if not data.startswith(V2_SIGNATURE):
        raise DatagramDropped("v1", "PROXY v1 header: UDP needs v2")
    try:
        parsed = parse(data, allow_udp=True)
    except InvalidProxyHeader as e:
        raise DatagramDropped("invalid", str(e)) from None
    if parsed is None:
        raise DatagramDropped("truncated", "PROXY v2 header longer than the datagram")
    info, length = parsed
    if info.source is None:
        raise DatagramDropped("local", f"PROXY v2 {info.command} header: no client to relay for")
    if info.transport != "UDP":
        raise DatagramDropped("stream", "PROXY v2 header for a STREAM transport")
    return info.source, info.destination, data[length:]


def session_header(client: Address, destination: Address, unique_id: str | None) -> bytes:
    """
    The v2 DGRAM header a session sends ahead of each datagram: C{client}
    and C{destination} in one family (see L{unify_families}); a wildcard
    destination (a listener on C{::} or C{0.0.0.0}) becomes the wildcard of
    the client's family, since the address the client wrote to is unknown.
    """
    if ipaddress.ip_address(destination[0]).is_unspecified:
        destination = ("0.0.0.0" if "." in client[0] else "::", destination[1])  # "." : IPv4, mapped or not
    source, target = unify_families(client, destination)
    tlvs = [] if unique_id is None else [(PP2_TYPE_UNIQUE_ID, unique_id.encode("ascii"))]
    return build_v2(source, target, transport="UDP", tlvs=tlvs)
