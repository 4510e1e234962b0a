"""
A strict, incremental parser for PROXY protocol v1 and v2 headers.

The parser runs on bytes received from an untrusted peer before anything else
is known about it, so it is written to:

  - accept only what the HAProxy specification (doc/proxy-protocol.txt)
    allows, e.g. no leading zeros, no zone ids, no unassigned command or
    family values (except on LOCAL, whose family the spec says to ignore);
  - fail as early as possible: a v1 line is checked field by field as each
    field is completed, and a v2 header is refused as soon as its 16-byte
    fixed part announces something invalid, so a peer can never make us
    buffer more than L{MAX_V1_LENGTH} or L{MAX_V2_LENGTH} bytes;
  - check the TLVs L{ProxyInfo} decodes (ALPN, AUTHORITY, SSL) as strictly
    as the rest, and keep the others unread: a header the properties could
    not decode is refused here;
  - raise nothing but L{InvalidProxyHeader}, and never look past the header.

The caller buffers what it receives and calls L{parse} again with the whole
buffer each time more bytes arrive: headers are small and sent at once, so
re-parsing costs less than keeping parser state.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable

import crc32c

from .exceptions import InvalidProxyHeader
from .info import (
    ALPN,
    AUTHORITY,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    Command,
    ProxyInfo,
    Transport,
    canonical_host,
    decode_ssl,
    iter_tlvs,
)

__all__ = [
    "MAX_UNIQUE_ID_LENGTH",
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "Detection",
    "detect",
    "parse",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: The longest v1 line the spec allows, CRLF included.
MAX_V1_LENGTH = 107
#: The largest v2 header we accept, the 16-byte fixed part included.  The
#: format allows 16 + 65535 bytes; like go-proxyproto we refuse to buffer
#: more than a page for a header that real proxies keep well under an MSS.
MAX_V2_LENGTH = 4096
#: Section 2.2.5 of the spec: a unique id is "up to 128 bytes".
MAX_UNIQUE_ID_LENGTH = 128

# The v2 fixed part: signature, version/command, family/transport, length.
V2_FIXED_LENGTH = 16
V2_VERSION = 0x2
V2_COMMANDS: dict[int, Command] = {0x0: "LOCAL", 0x1: "PROXY"}
#: Family/transport byte -> (transport, size of the address block): the
#: combinations the spec lists as expected, except AF_UNIX.  A LOCAL header
#: may carry any other byte; its address block then has no known size.
V2_FAMILIES: dict[int, tuple[Transport, int]] = {
    0x00: ("UNSPEC", 0),
    0x11: ("TCP", 12),
    0x12: ("UDP", 12),
    0x21: ("TCP", 36),
    0x22: ("UDP", 36),
}
_AF_UNIX = 0x3

#: v1 protocol field -> IP version of its addresses.
_V1_PROTOCOLS = {b"TCP4": 4, b"TCP6": 6}
_V1_UNKNOWN = b"UNKNOWN"
#: protocol, source, destination, source port, destination port.
_V1_FIELD_COUNT = 5
#: Bytes allowed in a v1 line before its CRLF: printable US-ASCII and space.
_V1_PRINTABLE = bytes(range(0x20, 0x7F))
_MAX_PORT_DIGITS = 5


class Detection(enum.Enum):
    """
    Whether a connection starts with a PROXY protocol header, judged from
    the bytes received so far (see L{detect}).
    """

    #: A complete v1 or v2 signature is present: hand the bytes to L{parse}.
    HEADER = "header"
    #: The bytes cannot be the start of either signature.
    NO_HEADER = "no-header"
    #: Too few bytes to tell: wait for more.
    UNDECIDED = "undecided"


def detect(prefix: bytes) -> Detection:
    """
    Tell whether C{prefix}, the first bytes received on a connection, starts
    with a PROXY protocol signature.  The signatures start with different
    bytes (C{"P"}, C{"\\r"}), so most non-PROXY traffic is recognised after
    the first byte.
    """
    undecided = False
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        if prefix[: len(signature)] == signature:
            return Detection.HEADER
        undecided = undecided or signature.startswith(prefix)
    return Detection.UNDECIDED if undecided else Detection.NO_HEADER


def parse(data: bytes, *, allow_udp: bool = False) -> tuple[ProxyInfo, int] | None:
    """
    Parse the PROXY protocol header at the start of C{data}.

    @param data: everything received on the connection so far.
    @param allow_udp: accept v2 headers for UDP (DGRAM) connections; a TCP
        listener must refuse them.
    @return: L{None} if C{data} is a valid but incomplete header, or the
        parsed header and its length in bytes; C{data} after that length is
        payload and has not been looked at.
    @raise InvalidProxyHeader: as soon as C{data} cannot be the start of a
        valid header.
    """
    detection = detect(data)
    if detection is Detection.UNDECIDED:
        return None
    if detection is Detection.NO_HEADER:
        raise InvalidProxyHeader("no PROXY protocol signature")
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data, allow_udp)
    return _parse_v1(data)


# -- v1 ---------------------------------------------------------------------


def _parse_v1(data: bytes) -> tuple[ProxyInfo, int] | None:
    """
    Parse a v1 line, or check the fields of an incomplete one.

    A field is checked as soon as the space or CRLF after it has arrived, so
    a bad field is refused before the line is complete.
    """
    data = bytes(data[:MAX_V1_LENGTH])
    end = data.find(b"\r\n")
    complete = end >= 0
    if complete:
        line = data[:end]
    elif len(data) == MAX_V1_LENGTH:
        raise InvalidProxyHeader(f"v1: no CRLF within {MAX_V1_LENGTH} bytes")
    else:
        # A trailing CR may be the first half of the CRLF.
        line = data.removesuffix(b"\r")
    _check_v1_bytes(line)

    fields = line[len(V1_SIGNATURE) :].split(b" ")
    finished = fields if complete else fields[:-1]
    if not finished:
        return None
    if finished[0] == _V1_UNKNOWN:
        # The spec lets anything follow UNKNOWN: the receiver ignores it.
        return (ProxyInfo(1, "UNKNOWN", "UNSPEC", None, None), end + 2) if complete else None
    if b"" in finished:
        raise InvalidProxyHeader("v1: empty field, fields are separated by single spaces")
    version = _V1_PROTOCOLS.get(finished[0])
    if version is None:
        raise InvalidProxyHeader("v1: protocol must be TCP4, TCP6 or UNKNOWN")
    if len(fields) > _V1_FIELD_COUNT:
        raise InvalidProxyHeader("v1: too many fields")
    if complete and len(fields) < _V1_FIELD_COUNT:
        raise InvalidProxyHeader("v1: missing fields")

    hosts = [_v1_address(field, version) for field in finished[1:3]]
    ports = [_v1_port(field) for field in finished[3:5]]
    if not complete:
        return None
    info = ProxyInfo(1, "PROXY", "TCP", (hosts[0], ports[0]), (hosts[1], ports[1]))
    return info, end + 2


def _check_v1_bytes(line: bytes) -> None:
    """
    Refuse control characters and non-ASCII bytes, which also catches a
    bare LF or a CR that is not followed by LF.
    """
    invalid = line.translate(None, _V1_PRINTABLE)
    if not invalid:
        return
    if invalid[0] == 0x0A:
        raise InvalidProxyHeader("v1: bare LF, the line must end with CRLF")
    if invalid[0] == 0x0D:
        raise InvalidProxyHeader("v1: CR not followed by LF")
    raise InvalidProxyHeader(f"v1: invalid byte 0x{invalid[0]:02x}")


def _v1_address(field: bytes, version: int) -> str:
    """
    Return the canonical form of a literal IP address of the given version.

    L{ipaddress} already refuses hostnames and IPv4 octets with leading
    zeros; zone ids (C{fe80::1%eth0}) it accepts, but they mean nothing to
    the receiving host.
    """
    if b"%" in field:
        raise InvalidProxyHeader("v1: IPv6 zone ids are not allowed")
    try:
        address = ipaddress.ip_address(field.decode("ascii"))
    except ValueError:
        raise InvalidProxyHeader(f"v1: invalid IPv{version} address") from None
    if address.version != version:
        raise InvalidProxyHeader(f"v1: IPv{address.version} address in a TCP{version} header")
    return canonical_host(address)


def _v1_port(field: bytes) -> int:
    """
    Return a port written in plain decimal: digits only, no sign, no
    leading zero, at most 65535.
    """
    if not field.isdigit():
        raise InvalidProxyHeader("v1: port is not a decimal number")
    if len(field) > 1 and field.startswith(b"0"):
        raise InvalidProxyHeader("v1: port has a leading zero")
    if len(field) > _MAX_PORT_DIGITS or int(field) > 0xFFFF:
        raise InvalidProxyHeader("v1: port out of range")
    return int(field)


# -- v2 ---------------------------------------------------------------------


def _parse_v2(data: bytes, allow_udp: bool) -> tuple[ProxyInfo, int] | None:
    """
    Parse a binary header, checking each byte of the fixed part as soon as
    it arrives and the declared length before waiting for the rest.
    """
    signature_length = len(V2_SIGNATURE)
    if len(data) <= signature_length:
        return None
    command = _v2_command(data[signature_length])
    if len(data) <= signature_length + 1:
        return None
    transport, known_size = _v2_family(data[signature_length + 1], command, allow_udp)
    if len(data) < V2_FIXED_LENGTH:
        return None

    length = int.from_bytes(data[signature_length + 2 : V2_FIXED_LENGTH], "big")
    total = V2_FIXED_LENGTH + length
    if total > MAX_V2_LENGTH:
        raise InvalidProxyHeader(f"v2: declared length {length} exceeds {MAX_V2_LENGTH - V2_FIXED_LENGTH}")
    # An address block of unknown size takes the whole block: no TLVs.
    address_size = length if known_size is None else known_size
    if length < address_size:
        raise InvalidProxyHeader(
            f"v2: declared length {length} is shorter than the {address_size}-byte address block"
        )
    if len(data) < total:
        return None

    header = bytes(data[:total])
    tlvs = _v2_tlvs(header, V2_FIXED_LENGTH + address_size)
    if command == "LOCAL":
        # The spec: "discard the protocol block including the family".
        return ProxyInfo(2, "LOCAL", "UNSPEC", None, None, tlvs), total
    source, destination = _v2_addresses(header, address_size)
    return ProxyInfo(2, "PROXY", transport, source, destination, tlvs), total


def _v2_command(byte: int) -> Command:
    """
    Decode the version/command byte: only version 2 with a defined command
    is valid, the spec says to drop anything else.
    """
    if byte >> 4 != V2_VERSION:
        raise InvalidProxyHeader(f"v2: unsupported version {byte >> 4}")
    command = V2_COMMANDS.get(byte & 0x0F)
    if command is None:
        raise InvalidProxyHeader(f"v2: invalid command {byte & 0x0F}")
    return command


def _v2_family(byte: int, command: Command, allow_udp: bool) -> tuple[Transport, int | None]:
    """
    Decode the family/transport byte into the transport and the size of the
    address block.

    A LOCAL header's family is never used (the spec: the receiver "must
    discard the protocol block including the family", and HAProxy does), so
    any byte is accepted there; one not listed in L{V2_FAMILIES} leaves the
    size unknown (L{None}).
    """
    family = V2_FAMILIES.get(byte)
    if command == "LOCAL":
        return family or ("UNSPEC", None)
    if family is None:
        if byte >> 4 == _AF_UNIX:
            raise InvalidProxyHeader("v2: unsupported address family AF_UNIX")
        raise InvalidProxyHeader(f"v2: invalid address family/transport 0x{byte:02x}")
    if family[0] == "UDP" and not allow_udp:
        raise InvalidProxyHeader("v2: UDP is not allowed on this listener")
    return family


def _v2_addresses(header: bytes, address_size: int) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """
    Decode the address block: two addresses of equal width, then two ports.
    """
    if not address_size:
        return None, None
    width = (address_size - 4) // 2
    start = V2_FIXED_LENGTH
    # ip_address() takes 4 bytes as IPv4 and 16 bytes as IPv6.
    source = ipaddress.ip_address(header[start : start + width])
    destination = ipaddress.ip_address(header[start + width : start + 2 * width])
    source_port, destination_port = struct.unpack_from("!HH", header, start + 2 * width)
    return (canonical_host(source), source_port), (canonical_host(destination), destination_port)


def _v2_tlvs(header: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    """
    Split what follows the address block into TLVs, which must fill it
    exactly, verify the CRC32C TLV if there is one, then check the values
    of the types this package gives meaning to.
    """
    tlvs = []
    crc_offset = None
    try:
        for kind, start, end in iter_tlvs(header, offset, "the declared length"):
            if kind == PP2_TYPE_CRC32C:
                if crc_offset is not None:
                    raise ValueError("duplicate CRC32C TLV")
                if end - start != 4:
                    raise ValueError("CRC32C TLV must be 4 bytes")
                crc_offset = start
            elif kind == PP2_TYPE_UNIQUE_ID and end - start > MAX_UNIQUE_ID_LENGTH:
                raise ValueError(f"UNIQUE_ID TLV longer than {MAX_UNIQUE_ID_LENGTH} bytes")
            tlvs.append((kind, header[start:end]))
        if crc_offset is not None:
            _v2_check_crc32c(header, crc_offset)
        for kind, value in tlvs:
            if kind in _CHECKED_TLVS:
                _CHECKED_TLVS[kind](value)
    except ValueError as error:
        raise InvalidProxyHeader(f"v2: {error}") from None
    return tuple(tlvs)


#: The TLV types whose values L{ProxyInfo} decodes, with their decoders: a
#: header whose values they refuse is invalid, so the properties never fail.
_CHECKED_TLVS: dict[int, Callable[[bytes], object]] = {
    PP2_TYPE_ALPN: ALPN.decode,
    PP2_TYPE_AUTHORITY: AUTHORITY.decode,
    PP2_TYPE_SSL: decode_ssl,
}


def _v2_check_crc32c(header: bytes, offset: int) -> None:
    """
    Verify the checksum the way section 2.2.3 says: over the whole header
    with the 4-byte checksum field set to zeros.
    """
    received = int.from_bytes(header[offset : offset + 4], "big")
    zeroed = header[:offset] + bytes(4) + header[offset + 4 :]
    if crc32c.crc32c(zeroed) != received:
        raise ValueError("CRC32c mismatch")
