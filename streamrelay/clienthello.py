"""
Peek at a TLS ClientHello to route a connection on its server name, like
nginx's C{ssl_preread} or HAProxy's C{req.ssl_sni}, without consuming it:
the relay replays every byte to the target it picks, which does the TLS.

The hello comes from an untrusted peer before anything else is known about
it, so, like the PROXY protocol parser, reading it is:

  - strict: only a ClientHello that RFC 8446 and RFC 5246 (with RFC 6066's
    server_name and RFC 7301's ALPN) allow is accepted, every length
    checked against the container it sits in;
  - early and bounded: each length is checked as soon as its bytes arrive,
    before what it announces, so a malformed hello is refused at the byte
    that makes it so (inside the three extensions read, once the extension
    is whole), and no hello needs more than L{MAX_PEEK} bytes;
  - incremental: L{HelloReader} looks at each byte once, however the peer
    splits them into records and segments.  (Re-parsing everything after
    each read, as the PROXY parser does, would let a peer that trickles a
    16 KiB hello in one-byte records cost minutes of CPU.)  L{peek} is the
    same for bytes already in hand;
  - pure: no I/O, nothing raised but L{InvalidClientHello}.

L{NameTable} maps a server name to a route the way nginx's C{server_name}
does: the exact name, else the longest C{*.suffix} wildcard, else C{*}.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Final, Generic, TypeAlias, TypeVar

__all__ = ["MAX_HELLO", "MAX_PEEK", "ClientHello", "HelloReader", "InvalidClientHello", "NameTable", "peek"]

#: The largest ClientHello accepted (its handshake length, header excluded):
#: a hello may span records, but real ones stay far below one record.
MAX_HELLO: Final = 16384
#: The largest record: 2**14 bytes of plaintext (RFC 8446, section 5.1).
_MAX_RECORD: Final = 16384
_RECORD_HEADER: Final = 5  # content type, version, length
_HANDSHAKE_HEADER: Final = 4  # message type, 24-bit length
#: The longest prefix a hello can need: one of L{MAX_HELLO} bytes sent one
#: byte per record, each behind a record header.
MAX_PEEK: Final = (_HANDSHAKE_HEADER + MAX_HELLO) * (_RECORD_HEADER + 1)

_HANDSHAKE: Final = 22  # record content type
_CLIENT_HELLO: Final = 1  # handshake message type
_SERVER_NAME: Final = 0  # extension types
_ALPN: Final = 16
_SUPPORTED_VERSIONS: Final = 43
_EXTENSION_NAMES: Final = {
    _SERVER_NAME: "server_name extension",
    _ALPN: "ALPN extension",
    _SUPPORTED_VERSIONS: "supported_versions extension",
}
_EXTENSION_HEADER: Final = struct.Struct("!HH")  # type, length
_HOST_NAME: Final = 0  # server_name entry type
_RANDOM: Final = 32
_MAX_SESSION_ID: Final = 32

_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_MAX_NAME: Final = 253
_MAX_LABEL: Final = 63


class InvalidClientHello(ValueError):
    """
    The bytes at the start of a connection are not a TLS ClientHello and
    never will be, however many more arrive.

    C{str()} is a short reason for the log, such as C{"not a TLS handshake
    record"}; it never echoes the peer's bytes.
    """


@dataclass(frozen=True)
class ClientHello:
    """What a route can be chosen on."""

    #: The SNI host_name: lower-case, no trailing dot, a valid DNS name.
    server_name: str | None
    #: The ALPN protocols offered, in the client's order (one character per
    #: byte: ALPN names are octet strings, nearly always ASCII).
    alpn: tuple[str, ...]
    #: The hello's own version field: 0x0303 from any TLS 1.2 or 1.3 client.
    legacy_version: int
    #: The supported_versions extension, in order; empty if absent.
    supported_versions: tuple[int, ...]


def peek(data: bytes) -> ClientHello | None:
    """
    Parse the ClientHello at the start of C{data}, all that has been
    received on a connection.  A caller that reads more should feed a
    L{HelloReader} instead of calling this again.

    @return: L{None} while C{data} is a valid but incomplete ClientHello,
        then the L{ClientHello}.  Bytes after it are not looked at.
    @raise InvalidClientHello: if C{data} cannot be the start of one.
    """
    return HelloReader().feed(data)


class HelloReader:
    """
    Reads a ClientHello from a connection's bytes as they arrive: the record
    layer here, the handshake message in a parser that waits for bytes where
    it needs them.
    """

    def __init__(self) -> None:
        #: The handshake bytes so far, the records' fragments end to end.
        self._message = bytearray()
        self._parser = _client_hello(self._message)
        #: The header of the next record, while incomplete.
        self._header = b""
        #: How much of the current record is still to come.
        self._left = 0

    def feed(self, data: bytes) -> ClientHello | None:
        """
        Read the connection's next bytes.  Once it has returned a hello or
        raised, it has nothing more to say: feed it no more.

        @return: L{None} while the hello is incomplete, then the hello.  The
            bytes after it are not looked at.
        @raise InvalidClientHello: as soon as the bytes so far cannot start
            a ClientHello.
        """
        position = 0
        while position < len(data):
            if self._left:
                fragment = data[position : position + self._left]
                position += len(fragment)
                self._left -= len(fragment)
                self._message += fragment
                try:
                    next(self._parser)
                except StopIteration as done:
                    hello: ClientHello = done.value
                    return hello
            else:
                taken = data[position : position + _RECORD_HEADER - len(self._header)]
                position += len(taken)
                self._header += taken
                self._left = _record_length(self._header, first=not self._message)
                if len(self._header) == _RECORD_HEADER:
                    self._header = b""
        return None


def _record_length(header: bytes, *, first: bool) -> int:
    """
    Check a record header as far as it has arrived; return the record's
    length once the header is complete, else 0.
    """
    if first and header[0] & 0x80:
        # The high bit starts a two-byte SSLv2 record header.
        raise InvalidClientHello("SSLv2 ClientHello is not supported")
    if header[0] != _HANDSHAKE:
        raise InvalidClientHello("not a TLS handshake record")
    if header[1:2] not in (b"", b"\x03"):
        raise InvalidClientHello("record version is not 3.x")
    # The length's bytes still to come can only add to it.
    length = int.from_bytes(header[3:5].ljust(2, b"\x00"), "big")
    if length > _MAX_RECORD:
        raise InvalidClientHello(f"record length above {_MAX_RECORD}")
    if len(header) < _RECORD_HEADER:
        return 0
    if not length:
        raise InvalidClientHello("empty handshake record")
    return length


# -- the handshake message ---------------------------------------------------

_T = TypeVar("_T")
#: A parser that runs until it needs bytes that have not arrived, yields,
#: and is resumed when more have.
_Parsing: TypeAlias = Generator[None, None, _T]


class _Reader:
    """
    Reads one container of the hello (the message, an extension, a list)
    from the growing message buffer.

    C{end} is where the container ends by its declared length, which may lie
    beyond the bytes received: L{wait} for bytes before reading them.  Going
    past C{end} refuses the hello, as soon as the length that would is read.
    """

    def __init__(self, data: bytearray, position: int, end: int, name: str) -> None:
        self.data = data
        self.position = position
        self.end = end
        self.name = name

    @property
    def size(self) -> int:
        """What is left of the container by its declared length."""
        return self.end - self.position

    def wait(self, size: int) -> _Parsing[None]:
        """Wait until the next C{size} bytes have arrived."""
        stop = self.position + size
        if stop > self.end:
            raise InvalidClientHello(f"truncated {self.name}")
        while len(self.data) < stop:
            yield

    def take(self, size: int) -> bytes:
        start = self.position
        if size > self.end - start:
            raise InvalidClientHello(f"truncated {self.name}")
        self.position = start + size
        return bytes(self.data[start : self.position])

    def integer(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int, name: str) -> _Reader:
        """Step over a length-prefixed field; return a reader over it."""
        return self.part(self.integer(length_size), name)

    def part(self, length: int, name: str) -> _Reader:
        """Step over the next C{length} bytes; return a reader over them."""
        start = self.position
        if length > self.end - start:
            raise InvalidClientHello(f"truncated {self.name}")
        self.position = start + length
        return _Reader(self.data, start, self.position, name)

    def finish(self) -> None:
        """Check that the field just read was the container's last."""
        if self.size:
            raise InvalidClientHello(f"trailing bytes in {self.name}")


def _client_hello(message: bytearray) -> _Parsing[ClientHello]:
    """
    Parse the handshake message, pausing where it needs bytes: field by
    field, and an extension it reads once all of it is there.
    """
    header = _Reader(message, 0, _HANDSHAKE_HEADER, "handshake header")
    yield from header.wait(1)
    message_type = header.integer(1)
    if message_type != _CLIENT_HELLO:
        raise InvalidClientHello(f"handshake message type {message_type} is not ClientHello")
    hello_length = 0
    for shift in (16, 8, 0):  # byte by byte: those still to come can only add
        yield from header.wait(1)
        hello_length |= header.integer(1) << shift
        if hello_length > MAX_HELLO:
            raise InvalidClientHello(f"ClientHello above {MAX_HELLO} bytes")
    body = _Reader(message, _HANDSHAKE_HEADER, _HANDSHAKE_HEADER + hello_length, "ClientHello")
    yield from body.wait(2)
    legacy_version = body.integer(2)
    if legacy_version >> 8 != 3:
        raise InvalidClientHello("ClientHello version is not 3.x")
    yield from body.wait(_RANDOM + 1)
    body.take(_RANDOM)
    if body.vector(1, "session id").size > _MAX_SESSION_ID:
        raise InvalidClientHello(f"session id above {_MAX_SESSION_ID} bytes")
    yield from body.wait(2)
    suites = body.vector(2, "cipher suites").size
    if suites < 2 or suites % 2:
        raise InvalidClientHello("cipher suites length is odd or zero")
    yield from body.wait(1)
    if not body.vector(1, "compression methods").size:
        raise InvalidClientHello("no compression methods")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if body.size:
        yield from body.wait(2)
        extensions = body.vector(2, "extensions")
        body.finish()
        seen: set[int] = set()
        while extensions.size:
            yield from extensions.wait(_EXTENSION_HEADER.size)
            kind, size = _EXTENSION_HEADER.unpack(extensions.take(_EXTENSION_HEADER.size))
            extension = extensions.part(size, _EXTENSION_NAMES.get(kind, "extension"))
            if kind in seen:
                raise InvalidClientHello(f"duplicate extension {kind}")
            seen.add(kind)
            if kind in _EXTENSION_NAMES:
                yield from extension.wait(size)
            if kind == _SERVER_NAME:
                server_name = _server_name(extension)
            elif kind == _ALPN:
                alpn = _alpn(extension)
            elif kind == _SUPPORTED_VERSIONS:
                versions = _supported_versions(extension)
    yield from body.wait(body.size)
    return ClientHello(server_name, alpn, legacy_version, versions)


def _server_name(extension: _Reader) -> str | None:
    """
    The host_name of an RFC 6066 server_name list.  Entries of other types
    (none is assigned) are skipped: the RFC gives them a 16-bit length.
    """
    entries = extension.vector(2, "server_name list")
    extension.finish()
    if not entries.size:
        raise InvalidClientHello("empty server_name list")
    host_name = None
    seen: set[int] = set()
    while entries.size:
        kind = entries.integer(1)
        name = entries.vector(2, "server_name list")
        if kind in seen:
            raise InvalidClientHello(f"duplicate name type {kind} in server_name")
        seen.add(kind)
        if kind == _HOST_NAME:
            try:
                host_name = _host_name(name.take(name.size).decode("latin-1"))
            except ValueError as error:
                raise InvalidClientHello(f"server_name: {error}") from None
    return host_name


def _alpn(extension: _Reader) -> tuple[str, ...]:
    names = extension.vector(2, "ALPN list")
    extension.finish()
    if not names.size:
        raise InvalidClientHello("empty ALPN list")
    protocols: list[str] = []
    while names.size:
        name = names.vector(1, "ALPN list")
        if not name.size:
            raise InvalidClientHello("empty ALPN protocol name")
        protocols.append(name.take(name.size).decode("latin-1"))
    return tuple(protocols)


def _supported_versions(extension: _Reader) -> tuple[int, ...]:
    versions = extension.vector(1, "supported_versions list")
    extension.finish()
    if not versions.size or versions.size % 2:
        raise InvalidClientHello("supported_versions length is odd or zero")
    return tuple(version for (version,) in struct.iter_unpack("!H", versions.take(versions.size)))


# -- names -------------------------------------------------------------------


def _host_name(text: str, *, wildcard: bool = False) -> str:
    """
    C{text} as a DNS host name in canonical form: lower-case, without its
    trailing dot.  With C{wildcard}, C{*} may be the whole first label.

    @raise ValueError: naming the problem, e.g. C{"empty label"}.
    """
    if not text.isascii():  # before lower(), which maps some non-ASCII to ASCII
        raise ValueError("not ASCII")
    name = text.lower().removesuffix(".")
    if not name:
        raise ValueError("empty")
    if len(name) > _MAX_NAME:
        raise ValueError(f"longer than {_MAX_NAME} characters")
    labels = name.split(".")
    if wildcard and labels[0] == "*":
        del labels[0]
    for label in labels:
        if not label:
            raise ValueError("empty label")
        if len(label) > _MAX_LABEL:
            raise ValueError(f"label longer than {_MAX_LABEL} characters")
        if wildcard and "*" in label:
            raise ValueError("'*' other than as the whole first label")
        if not _LABEL.match(label):
            raise ValueError("label not made of letters, digits and inner hyphens")
    return name


class NameTable(Generic[_T]):
    """
    Server name patterns and what each selects, matched as nginx's
    C{server_name} does: the exact name, else the longest C{*.suffix}
    wildcard (one or more labels before the suffix), else the default C{*}.

    A lookup costs one dict probe per label of the name, however many
    patterns there are.
    """

    def __init__(self, entries: Iterable[tuple[str, _T]]) -> None:
        """
        @raise ValueError: for an invalid pattern (see L{normalize}), or a
            pattern given twice, named in its normalized form.
        """
        self._exact: dict[str, _T] = {}
        # "*.example.org" under "example.org"; the default "*" under "", the
        # suffix of every name.
        self._wildcards: dict[str, _T] = {}
        for pattern, value in entries:
            name = self.normalize(pattern)
            table, key = (self._wildcards, name[2:]) if name[0] == "*" else (self._exact, name)
            if key in table:
                raise ValueError(f"duplicate server name pattern {name!r}")
            table[key] = value

    @staticmethod
    def normalize(pattern: str) -> str:
        """
        Check a pattern (an exact name, C{*.suffix} or C{*}) and return it
        lower-case without its trailing dot.

        @raise ValueError: saying what is wrong with it (C{"empty label"}),
            for the caller to put next to the pattern.
        """
        return _host_name(pattern, wildcard=True)

    def lookup(self, server_name: str | None) -> _T | None:
        """
        What C{server_name} (as L{peek} gives it, in any case) selects: for
        a hello without one, the default; L{None} if nothing matches.
        """
        if server_name is not None:
            name = server_name.lower()
            if name in self._exact:
                return self._exact[name]
            dot = name.find(".")
            while dot >= 0:
                suffix = name[dot + 1 :]
                if suffix in self._wildcards:
                    return self._wildcards[suffix]
                dot = name.find(".", dot + 1)
        return self._wildcards.get("")
