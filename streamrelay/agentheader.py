"""
GoDoxy's agent stream header: the 275 bytes a tunnel's client sends first,
after the mutual-TLS handshake, to name the target the agent dials.

Layout: version (8 bytes, C{0.1.0} NUL-padded); host length (1) and host
(255, NUL-padded); port length (1) and port (5, ASCII decimal,
NUL-padded); flags (1; bit 0: close at once, a health-check probe); CRC-32
(IEEE) of the 271 bytes before it, big-endian.  The replies carry no header.

L{HeaderReader} is the agent's side of it: the pair's reader of the request
that names the target (as a gateway's line does, L{streamrelay.tcp}),
checked against the agent's C{allow_targets}.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

from .config import AgentConfig
from .dial import is_ip_literal

__all__ = ["HEADER_SIZE", "PROBE", "HeaderError", "HeaderReader", "Request", "decode_header", "encode_header"]

HEADER_SIZE: Final = 275
VERSION: Final = b"0.1.0"
#: Flag bit 0: answer by closing, without dialing (a health-check probe).
PROBE: Final = 1

_LAYOUT = struct.Struct("!8sB255sB5sBI")
assert _LAYOUT.size == HEADER_SIZE


class HeaderError(ValueError):
    """A header the agent refuses; the message says why."""


@dataclass(frozen=True)
class Request:
    """What a header asks for."""

    host: str
    port: int
    probe: bool = False


def encode_header(host: str, port: int, flags: int = 0) -> bytes:
    """The header asking for C{host}:C{port} (a name or an IP literal, unbracketed)."""
    name = host.encode("idna")
    digits = str(port).encode("ascii")
    if len(name) > 255 or not 1 <= port <= 65535:
        raise HeaderError(f"cannot ask for {host}:{port}")
    body = _LAYOUT.pack(VERSION, len(name), name, len(digits), digits, flags, 0)[:-4]
    return body + struct.pack("!I", zlib.crc32(body))


def decode_header(data: bytes) -> Request:
    """The request in a whole header; L{HeaderError} for a malformed one."""
    version, host_size, host, port_size, port, flags, checksum = _LAYOUT.unpack(data)
    if zlib.crc32(data[: HEADER_SIZE - 4]) != checksum:
        raise HeaderError("bad checksum")
    given = version.rstrip(b"\0")
    if given != VERSION:
        raise HeaderError(f"version {given!r}, not {VERSION.decode()}")
    if not 0 < host_size <= 255 or not 0 < port_size <= 5:
        raise HeaderError("host or port length out of range")
    digits = port[:port_size]
    if not digits.isdigit() or not 1 <= int(digits) <= 65535:
        raise HeaderError(f"port {digits!r} is not 1-65535")
    try:
        name = host[:host_size].decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError("host not ASCII") from None
    return Request(name.removeprefix("[").removesuffix("]"), int(digits), bool(flags & PROBE))


class HeaderReader:
    """
    The agent's reader of a tunnel's header, for its pair: the target it
    names, if C{allow_targets} has it (a probe's is not checked: it is not dialed).  Rules match IP addresses: a host
    name is only taken where C{any} is allowed.
    """

    def __init__(self, agent: AgentConfig) -> None:
        self.rules = agent.allow_targets
        self.any = any(rule.network is None and rule.ports is None for rule in self.rules)

    def take(self, data: bytes, client_host: str) -> tuple[Request, int] | Refusal | None:
        """The request and the bytes it took, a refusal, or C{None}: not all of it yet."""
        if len(data) < HEADER_SIZE:
            return None
        try:
            request = decode_header(data[:HEADER_SIZE])
        except HeaderError as e:
            return refusal("agent-header", str(e))
        if not request.probe and not self.allows(request):  # a probe dials nothing
            return refusal("agent-denied", "target not in allow_targets", target=f"{request.host}:{request.port}")
        return request, HEADER_SIZE

    def allows(self, request: Request) -> bool:
        if not is_ip_literal(request.host):
            return self.any
        address = ipaddress.ip_address(request.host)
        return any(rule.allows(address, request.port) for rule in self.rules)

    def timed_out(self) -> Refusal:
        return refusal("agent-header", "no header within header_timeout")


#: A refusal of what a pair's client sent first: the kind, the event's fields, and the reply written before closing.
Refusal = tuple[str, dict[str, Any], bytes]


def refusal(kind: str, reason: str, **fields: str) -> Refusal:
    """An agent's refusal: logged, then the tunnel closed (close_notify, no reply)."""
    return kind, {"reason": reason, **fields}, b""
