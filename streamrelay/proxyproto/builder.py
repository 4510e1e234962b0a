"""
Build PROXY protocol headers to send ahead of a relayed connection.

The builders produce only headers that L{parse} accepts (with C{allow_udp}
for UDP), and raise L{ValueError} for arguments that cannot be encoded, so a
bug in the relay shows up here rather than as a refused connection upstream.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import Literal

import crc32c as _crc32c

from .info import (
    ALPN,
    AUTHORITY,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    SSL_FIXED,
    SSL_STRINGS,
    VERIFY_FAILED,
    SSLInfo,
    canonical_host,
)
from .parser import (
    MAX_UNIQUE_ID_LENGTH,
    MAX_V2_LENGTH,
    V1_SIGNATURE,
    V2_COMMANDS,
    V2_FAMILIES,
    V2_FIXED_LENGTH,
    V2_SIGNATURE,
    V2_VERSION,
)

__all__ = ["build_v1", "build_v2", "tls_tlvs", "unify_families"]

Endpoint = tuple[str, int]
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_COMMAND_BITS = {command: bits for bits, command in V2_COMMANDS.items()}
_FAMILY_BYTES = {family: byte for byte, family in V2_FAMILIES.items()}
#: IP version -> size of the v2 address block (two addresses, two ports).
_ADDRESS_SIZES = {4: 2 * 4 + 2 * 2, 6: 2 * 16 + 2 * 2}
_UNSPEC = _FAMILY_BYTES[("UNSPEC", 0)]


def build_v1(source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """
    Build a v1 text header; without addresses it is C{PROXY UNKNOWN}.

    @raise ValueError: if only one address is given, the addresses are of
        different IP versions (see L{unify_families}), or one is invalid.
    """
    addresses = _endpoints(source, destination)
    if addresses is None:
        return V1_SIGNATURE + b"UNKNOWN\r\n"
    (source_host, source_port), (destination_host, destination_port) = addresses
    hosts = f"{canonical_host(source_host)} {canonical_host(destination_host)}"
    line = f"TCP{source_host.version} {hosts} {source_port} {destination_port}\r\n"
    return V1_SIGNATURE + line.encode("ascii")


def build_v2(
    source: Endpoint | None,
    destination: Endpoint | None,
    *,
    command: Literal["PROXY", "LOCAL"] = "PROXY",
    transport: Literal["TCP", "UDP"] = "TCP",
    tlvs: Sequence[tuple[int, bytes]] = (),
    crc32c: bool = False,
) -> bytes:
    """
    Build a v2 binary header.

    A LOCAL header, or one without addresses, uses the AF_UNSPEC family and
    carries no address block; C{transport} is then ignored.

    @param command: C{"PROXY"} or C{"LOCAL"} (addresses are then ignored).
    @param transport: C{"TCP"} or C{"UDP"}.
    @param tlvs: C{(type, value)} extensions to append, in order.  A CRC32C
        TLV cannot be given here, it depends on the rest of the header.
    @param crc32c: append a CRC32C TLV covering the whole header.
    @raise ValueError: for arguments that cannot be encoded, or a header
        longer than L{MAX_V2_LENGTH}.
    """
    if command not in _COMMAND_BITS:
        raise ValueError(f"command must be PROXY or LOCAL, not {command!r}")
    if transport not in ("TCP", "UDP"):
        raise ValueError(f"transport must be TCP or UDP, not {transport!r}")
    if any(kind == PP2_TYPE_CRC32C for kind, _ in tlvs):
        raise ValueError("pass crc32c=True instead of a CRC32C TLV")
    addresses = _endpoints(source, destination) if command == "PROXY" else None
    if addresses is None:
        family, address_block = _UNSPEC, b""
    else:
        (source_host, source_port), (destination_host, destination_port) = addresses
        family = _FAMILY_BYTES[(transport, _ADDRESS_SIZES[source_host.version])]
        ports = struct.pack("!HH", source_port, destination_port)
        address_block = source_host.packed + destination_host.packed + ports

    extensions = [_tlv(kind, value) for kind, value in tlvs]
    if crc32c:
        # Checksummed with the value zeroed, then patched in (section 2.2.3).
        extensions.append(_tlv(PP2_TYPE_CRC32C, bytes(4)))
    body = address_block + b"".join(extensions)
    if V2_FIXED_LENGTH + len(body) > MAX_V2_LENGTH:
        raise ValueError(f"v2 header of {V2_FIXED_LENGTH + len(body)} bytes exceeds {MAX_V2_LENGTH}")
    version_command = V2_VERSION << 4 | _COMMAND_BITS[command]
    header = V2_SIGNATURE + struct.pack("!BBH", version_command, family, len(body)) + body
    if crc32c:
        header = header[:-4] + _crc32c.crc32c(header).to_bytes(4, "big")
    return header


def tls_tlvs(*, authority: str | None, alpn: str | None, ssl: SSLInfo | None) -> list[tuple[int, bytes]]:
    """
    The TLVs that tell a target what the relay learned of the client's TLS,
    for L{build_v2}: PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY and PP2_TYPE_SSL,
    each only if given, in the order and layout HAProxy sends them
    (C{make_proxy_line_v2} in its src/connection.c, with
    C{send-proxy-v2-ssl-cn} and C{proxy-v2-options
    authority,ssl-cipher,cert-sig,cert-key}).

    @param authority: the host name the client asked for (its SNI).
    @param alpn: the application protocol negotiated, e.g. C{"h2"}.
    @param ssl: the TLS facts; C{verify} is sent as zero when the client
        certificate verified or there was none (as HAProxy does), else as
        OpenSSL's X509_V_ERR_UNSPECIFIED.
    @raise ValueError: for a value that is empty, not in the encoding the
        spec gives it, or longer than its TLV allows (255 bytes for a
        protocol name or an authority, 65535 for the SSL TLV as a whole).
    """
    tlvs = []
    if alpn is not None:
        tlvs.append((PP2_TYPE_ALPN, ALPN.encode(alpn)))
    if authority is not None:
        tlvs.append((PP2_TYPE_AUTHORITY, AUTHORITY.encode(authority)))
    if ssl is not None:
        tlvs.append((PP2_TYPE_SSL, _ssl_value(ssl)))
    return tlvs


def _ssl_value(ssl: SSLInfo) -> bytes:
    """
    The PP2_TYPE_SSL value: the C{client} bits, C{verify}, then a sub-TLV
    per string known.
    """
    client = (
        (PP2_CLIENT_SSL if ssl.client_ssl else 0)
        | (PP2_CLIENT_CERT_CONN if ssl.client_cert_conn else 0)
        | (PP2_CLIENT_CERT_SESS if ssl.client_cert_sess else 0)
    )
    certificate = ssl.client_cert_conn or ssl.client_cert_sess
    verify = VERIFY_FAILED if certificate and not ssl.verified else 0
    subtlvs = [
        _tlv(kind, SSL_STRINGS[kind].encode(text)) for kind, text in ssl.strings().items() if text is not None
    ]
    value = SSL_FIXED.pack(client, verify) + b"".join(subtlvs)
    _check_value_length(value)
    return value


def unify_families(
    source: Endpoint | None, destination: Endpoint | None
) -> tuple[Endpoint | None, Endpoint | None]:
    """
    Give both addresses the same IP version, as a PROXY header requires.

    A dual-stack listener reports an IPv4 client as C{::ffff:a.b.c.d}: if
    both addresses are IPv4 or IPv4-mapped, both become plain IPv4 (so the
    header says TCP4); if one is IPv4 and the other real IPv6, the IPv4 one
    is mapped into IPv6.  Hosts come back in canonical form; L{None}
    addresses are returned unchanged.

    @raise ValueError: if a host is not an IP address.
    """
    if source is None or destination is None:
        return source, destination
    hosts: list[_IPAddress] = [ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])]
    source_v4, destination_v4 = _unmapped(hosts[0]), _unmapped(hosts[1])
    if source_v4 is not None and destination_v4 is not None:
        hosts = [source_v4, destination_v4]
    elif hosts[0].version != hosts[1].version:
        hosts = [ipaddress.IPv6Address(f"::ffff:{host}") if host.version == 4 else host for host in hosts]
    return (canonical_host(hosts[0]), source[1]), (canonical_host(hosts[1]), destination[1])


def _unmapped(host: _IPAddress) -> ipaddress.IPv4Address | None:
    """
    Return C{host} as plain IPv4 if it is IPv4 or IPv4-mapped IPv6.
    """
    if isinstance(host, ipaddress.IPv4Address):
        return host
    return host.ipv4_mapped


def _endpoints(
    source: Endpoint | None, destination: Endpoint | None
) -> tuple[tuple[_IPAddress, int], tuple[_IPAddress, int]] | None:
    """
    Check a pair of endpoints for a header: both or neither given, literal
    IP addresses of the same version without zone id, valid ports.
    """
    if source is None and destination is None:
        return None
    if source is None or destination is None:
        raise ValueError("give both source and destination, or neither")
    pair = (_endpoint(source), _endpoint(destination))
    if pair[0][0].version != pair[1][0].version:
        raise ValueError("source and destination must be of the same IP version, see unify_families()")
    return pair


def _endpoint(endpoint: Endpoint) -> tuple[_IPAddress, int]:
    """
    Check one C{(host, port)} endpoint.
    """
    host, port = endpoint
    if not isinstance(host, str):
        raise ValueError(f"host must be a string, not {host!r}")
    if "%" in host:
        raise ValueError(f"{host!r}: a PROXY header cannot carry an IPv6 zone id")
    address = ipaddress.ip_address(host)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"invalid port {port!r}")
    return address, port


def _tlv(kind: int, value: bytes) -> bytes:
    """
    Encode one TLV, refusing what L{parse} would refuse.
    """
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"TLV type {kind} is not a byte")
    if kind == PP2_TYPE_UNIQUE_ID and len(value) > MAX_UNIQUE_ID_LENGTH:
        raise ValueError(f"UNIQUE_ID TLV longer than {MAX_UNIQUE_ID_LENGTH} bytes")
    _check_value_length(value)
    return struct.pack("!BH", kind, len(value)) + bytes(value)


def _check_value_length(value: bytes) -> None:
    if len(value) > 0xFFFF:
        raise ValueError(f"TLV value of {len(value)} bytes does not fit in 16 bits")
