"""
Tests for L{streamrelay.clienthello}: real ClientHellos from Python's ssl
module and pyOpenSSL, whole, byte by byte and re-framed across records; a
corpus of malformed hellos, each refused with its reason and no later than
the byte that makes it invalid; properties on random bytes and mutated
hellos, peeked at once or fed to a L{HelloReader} in pieces; and
L{NameTable}'s matching rules.

The malformed hellos are built field by field here, not with anything from
the module, so that a misreading shared by both cannot hide.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable, Sequence
from itertools import cycle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from streamrelay.clienthello import (
    MAX_HELLO,
    MAX_PEEK,
    ClientHello,
    HelloReader,
    InvalidClientHello,
    NameTable,
    peek,
)

SETTINGS = settings(max_examples=200, deadline=None)

TLS12, TLS13 = 0x0303, 0x0304


# -- building hellos ---------------------------------------------------------


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def u24(value: int) -> bytes:
    return value.to_bytes(3, "big")


def vec8(body: bytes, length: int | None = None) -> bytes:
    return bytes([len(body) if length is None else length]) + body


def vec16(body: bytes, length: int | None = None) -> bytes:
    return u16(len(body) if length is None else length) + body


def extension(kind: int, body: bytes, length: int | None = None) -> bytes:
    return u16(kind) + vec16(body, length)


def sni(*names: bytes) -> bytes:
    """A server_name extension of host_name entries."""
    return extension(0, vec16(b"".join(b"\x00" + vec16(name) for name in names)))


def alpn(*names: bytes) -> bytes:
    return extension(16, vec16(b"".join(vec8(name) for name in names)))


def hello(
    extensions: bytes | None = None,
    *,
    version: bytes = b"\x03\x03",
    session_id: bytes = vec8(bytes(32)),
    suites: bytes = vec16(b"\x13\x01\x13\x02"),
    compression: bytes = vec8(b"\x00"),
) -> bytes:
    """A ClientHello in one record, its fields given as raw bytes."""
    body = version + bytes(32) + session_id + suites + compression + (extensions or b"")
    return framed(b"\x01" + u24(len(body)) + body)


def exts(*items: bytes, length: int | None = None) -> bytes:
    """An extensions block."""
    return vec16(b"".join(items), length)


def unframe(data: bytes) -> bytes:
    """The handshake bytes carried by a run of records."""
    message = b""
    while data:
        length = int.from_bytes(data[3:5], "big")
        message += data[5 : 5 + length]
        data = data[5 + length :]
    return message


def framed(message: bytes, sizes: Sequence[int] = (), content_type: int = 22) -> bytes:
    """C{message} in records, their lengths taken in turn from C{sizes} (default: one record)."""
    lengths = cycle(sizes or [len(message)])
    records = []
    while message:
        size = next(lengths)
        fragment, message = message[:size], message[size:]
        records.append(bytes([content_type, 3, 1]) + u16(len(fragment)) + fragment)
    return b"".join(records)




# -- real hellos -------------------------------------------------------------


def python_hello(server_name: str | None, protocols: list[str], *, tls12_only: bool = False) -> bytes:
    """The first flight of a Python ssl client: its ClientHello records."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = server_name is not None
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if protocols:
        context.set_alpn_protocols(protocols)
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def pyopenssl_hello(server_name: bytes | None, protocols: list[bytes]) -> bytes:
    """The same from pyOpenSSL, which sends the server name exactly as given."""
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    if server_name is not None:
        client.set_tlsext_host_name(server_name)
    if protocols:
        client.set_alpn_protos(protocols)
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    return client.bio_read(65536)


REAL_HELLOS = {
    "python-tls13-sni-alpn": (
        python_hello("DB.Example.org", ["h2", "http/1.1"]),
        ClientHello("db.example.org", ("h2", "http/1.1"), TLS12, (TLS13, TLS12)),
    ),
    "python-tls13-bare": (python_hello(None, []), ClientHello(None, (), TLS12, (TLS13, TLS12))),
    "python-tls12-sni": (
        python_hello("a.b.example.org", ["acme-tls/1"], tls12_only=True),
        ClientHello("a.b.example.org", ("acme-tls/1",), TLS12, ()),
    ),
    "python-tls12-bare": (python_hello(None, [], tls12_only=True), ClientHello(None, (), TLS12, ())),
    "pyopenssl-trailing-dot": (
        pyopenssl_hello(b"Mail.Example.ORG.", [b"imap", b"h2"]),
        ClientHello("mail.example.org", ("imap", "h2"), TLS12, (TLS13, TLS12)),
    ),
    "pyopenssl-bare": (pyopenssl_hello(None, []), ClientHello(None, (), TLS12, (TLS13, TLS12))),
}
real_hellos = pytest.mark.parametrize(("data", "expected"), REAL_HELLOS.values(), ids=REAL_HELLOS.keys())


@real_hellos
def test_real_hello(data: bytes, expected: ClientHello) -> None:
    assert peek(data) == expected


@real_hellos
def test_byte_by_byte(data: bytes, expected: ClientHello) -> None:
    """Every strict prefix asks for more; the whole hello is the answer."""
    assert [peek(data[:end]) for end in range(len(data))] == [None] * len(data)
    assert peek(data) == expected
    reader = HelloReader()
    assert [reader.feed(data[end : end + 1]) for end in range(len(data))] == [None] * (len(data) - 1) + [expected]


@real_hellos
def test_fed_in_two(data: bytes, expected: ClientHello) -> None:
    """A reader fed the hello in two pieces answers after the second, wherever the cut."""
    for cut in range(len(data)):
        reader = HelloReader()
        assert (reader.feed(data[:cut]), reader.feed(data[cut:])) == (None, expected)


@real_hellos
@pytest.mark.parametrize("size", [1, 2, 3, 7, 100, 16384])
def test_reframed(data: bytes, expected: ClientHello, size: int) -> None:
    """A hello split into records of 1 to C{size} bytes parses the same."""
    assert peek(framed(unframe(data), range(1, size + 1))) == expected


def test_reframed_byte_by_byte() -> None:
    data, expected = REAL_HELLOS["python-tls13-sni-alpn"]
    reframed = framed(unframe(data), [1, 5, 2, 40])
    assert all(peek(reframed[:end]) is None for end in range(len(reframed)))
    assert peek(reframed) == expected


@real_hellos
def test_bytes_after_the_hello(data: bytes, expected: ClientHello) -> None:
    """What follows the hello (in its last record or after it) is not looked at."""
    application_data = b"\x17\x03\x03\x00\x01x"
    assert peek(data + application_data) == expected
    assert peek(framed(unframe(data) + b"\x00\x01")) == expected


def largest_hello() -> bytes:
    """A hello of MAX_HELLO bytes sent one byte per record."""
    fields = b"\x03\x03" + bytes(32) + vec8(b"") + vec16(b"\x13\x01") + vec8(b"\x00")
    padding = MAX_HELLO - len(fields) - 2 - 4  # the extensions length, the padding's header
    body = fields + vec16(extension(21, bytes(padding)))
    assert len(body) == MAX_HELLO
    return framed(b"\x01" + u24(len(body)) + body, [1])


def test_max_peek_is_the_longest_prefix_needed() -> None:
    data = largest_hello()
    assert len(data) == MAX_PEEK
    assert peek(data[:-1]) is None
    assert peek(data) == ClientHello(None, (), TLS12, ())


def test_trickled_largest_hello() -> None:
    """
    Fed one byte at a time, the largest hello costs the reader about what it
    costs at once (a re-parse per byte would take half an hour).
    """
    data = largest_hello()
    reader = HelloReader()
    started = time.process_time()
    assert [reader.feed(data[end : end + 1]) for end in range(len(data) - 1)] == [None] * (len(data) - 1)
    assert reader.feed(data[-1:]) == ClientHello(None, (), TLS12, ())
    assert time.process_time() - started < 10


# -- synthetic hellos --------------------------------------------------------


VALID = {
    "no extensions": (hello(), ClientHello(None, (), TLS12, ())),
    "empty extensions block": (hello(exts()), ClientHello(None, (), TLS12, ())),
    "sni, alpn, versions": (
        hello(exts(sni(b"example.org"), alpn(b"h2"), extension(43, vec8(b"\x03\x04\x03\x03")))),
        ClientHello("example.org", ("h2",), TLS12, (TLS13, TLS12)),
    ),
    "another name type skipped": (
        hello(exts(extension(0, vec16(b"\x07" + vec16(b"x") + b"\x00" + vec16(b"a.example"))))),
        ClientHello("a.example", (), TLS12, ()),
    ),
    "a name of 253 characters, labels of 63": (
        hello(exts(sni(b".".join([b"a" * 63] * 3 + [b"b" * 61])))),
        ClientHello(".".join(["a" * 63] * 3 + ["b" * 61]), (), TLS12, ()),
    ),
    "unknown extensions, empty and not": (
        hello(exts(extension(0xFF01, b""), extension(0x1A1A, b"\x00\x01"))),
        ClientHello(None, (), TLS12, ()),
    ),
}


@pytest.mark.parametrize(("data", "expected"), VALID.values(), ids=VALID.keys())
def test_valid(data: bytes, expected: ClientHello) -> None:
    """Corner cases a real client seldom sends, accepted once complete."""
    assert [peek(data[:end]) for end in range(len(data))] == [None] * len(data)
    assert peek(data) == expected


def long_label(length: int) -> bytes:
    return b"a" * length + b".example"


MALFORMED = {
    # The record layer.
    "application data": (b"\x17\x03\x03\x00\x05hello", "not a TLS handshake record"),
    "alert": (b"\x15\x03\x01\x00\x02\x02\x28", "not a TLS handshake record"),
    "HTTP": (b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", "not a TLS handshake record"),
    "SSLv2 hello": (
        bytes.fromhex("802e0103010015000000100100800700c0") + bytes(16),
        "SSLv2 ClientHello is not supported",
    ),
    "record version 2": (b"\x16\x02\x00" + hello()[3:], "record version is not 3.x"),
    "empty record": (b"\x16\x03\x01\x00\x00" + hello(), "empty handshake record"),
    "record above 16384": (b"\x16\x03\x01\x40\x01" + bytes(100), "record length above 16384"),
    "second record not handshake": (
        framed(unframe(hello())[:15]) + framed(unframe(hello())[15:], content_type=23),
        "not a TLS handshake record",
    ),
    "second record with the high bit": (framed(unframe(hello())[:15]) + b"\x80\x2e\x01", "not a TLS handshake record"),
    # The handshake header.
    "ServerHello": (framed(b"\x02" + unframe(hello())[1:]), "handshake message type 2 is not ClientHello"),
    "hello above MAX_HELLO": (framed(b"\x01" + u24(MAX_HELLO + 1)), f"ClientHello above {MAX_HELLO} bytes"),
    # The hello's own fields.
    "version 2.0": (hello(version=b"\x02\x00"), "ClientHello version is not 3.x"),
    "shorter than its random": (framed(b"\x01" + u24(10) + b"\x03\x03" + bytes(8)), "truncated ClientHello"),
    "session id of 33": (hello(session_id=vec8(bytes(33))), "session id above 32 bytes"),
    "session id overruns": (hello(session_id=vec8(b"", 200)), "truncated ClientHello"),
    "odd cipher suites": (hello(suites=vec16(b"\x13\x01\x13")), "cipher suites length is odd or zero"),
    "no cipher suites": (hello(suites=vec16(b"")), "cipher suites length is odd or zero"),
    "cipher suites overrun": (hello(suites=vec16(b"\x13\x01", 0x1000)), "truncated ClientHello"),
    "no compression methods": (hello(compression=vec8(b"")), "no compression methods"),
    "compression overruns": (hello(compression=vec8(b"\x00", 5)), "truncated ClientHello"),
    "one byte after compression": (hello(b"\x00"), "truncated ClientHello"),
    "extensions block short": (hello(exts(length=0) + sni(b"a.example")), "trailing bytes in ClientHello"),
    "extensions block overruns": (hello(exts(sni(b"a.example"), length=30)), "truncated ClientHello"),
    # The extensions block.
    "extension header cut": (hello(exts(b"\x00\x10\x00")), "truncated extensions"),
    "extension overruns": (hello(exts(extension(0x1234, b"ab", 10))), "truncated extensions"),
    "duplicate extension": (hello(exts(extension(0x1234, b""), extension(0x1234, b"x"))), "duplicate extension 4660"),
    "two server_name extensions": (hello(exts(sni(b"a.example"), sni(b"a.example"))), "duplicate extension 0"),
    # server_name.
    "empty server_name extension": (hello(exts(extension(0, b""))), "truncated server_name extension"),
    "server_name list overruns": (
        hello(exts(extension(0, vec16(b"\x00" + vec16(b"a"), 9)))),
        "truncated server_name extension",
    ),
    "server_name list short": (
        hello(exts(extension(0, vec16(b"\x00" + vec16(b"a")) + b"\x00"))),
        "trailing bytes in server_name extension",
    ),
    "empty server_name list": (hello(exts(extension(0, vec16(b"")))), "empty server_name list"),
    "host_name overruns": (
        hello(exts(extension(0, vec16(b"\x00" + vec16(b"example.org", 50))))),
        "truncated server_name list",
    ),
    "host_name entry cut": (hello(exts(extension(0, vec16(b"\x00\x00")))), "truncated server_name list"),
    "two host_names": (hello(exts(sni(b"a.example", b"b.example"))), "duplicate name type 0 in server_name"),
    "empty host_name": (hello(exts(sni(b""))), "server_name: empty"),
    "host_name a dot": (hello(exts(sni(b"."))), "server_name: empty"),
    "host_name with a space": (
        hello(exts(sni(b"a b.example"))),
        "server_name: label not made of letters, digits and inner hyphens",
    ),
    "host_name with an underscore": (
        hello(exts(sni(b"_a.example"))),
        "server_name: label not made of letters, digits and inner hyphens",
    ),
    "host_name with a leading hyphen": (
        hello(exts(sni(b"-a.example"))),
        "server_name: label not made of letters, digits and inner hyphens",
    ),
    "host_name a wildcard": (
        hello(exts(sni(b"*.example"))),
        "server_name: label not made of letters, digits and inner hyphens",
    ),
    "host_name with an empty label": (hello(exts(sni(b"a..example"))), "server_name: empty label"),
    "host_name with a label of 64": (hello(exts(sni(long_label(64)))), "server_name: label longer than 63 characters"),
    "host_name of 254": (
        hello(exts(sni(b".".join([b"a" * 63] * 3 + [b"b" * 62])))),
        "server_name: longer than 253 characters",
    ),
    "host_name in UTF-8": (hello(exts(sni("bücher.example".encode()))), "server_name: not ASCII"),
    # ALPN.
    "empty ALPN extension": (hello(exts(extension(16, b""))), "truncated ALPN extension"),
    "empty ALPN list": (hello(exts(extension(16, vec16(b"")))), "empty ALPN list"),
    "empty ALPN name": (hello(exts(alpn(b"h2", b""))), "empty ALPN protocol name"),
    "ALPN name overruns": (hello(exts(extension(16, vec16(b"\x05h2")))), "truncated ALPN list"),
    "ALPN list short": (hello(exts(extension(16, vec16(vec8(b"h2")) + b"x"))), "trailing bytes in ALPN extension"),
    # supported_versions.
    "odd supported_versions": (
        hello(exts(extension(43, vec8(b"\x03\x04\x03")))),
        "supported_versions length is odd or zero",
    ),
    "empty supported_versions": (hello(exts(extension(43, vec8(b"")))), "supported_versions length is odd or zero"),
    "supported_versions overruns": (
        hello(exts(extension(43, vec8(b"\x03\x04", 4)))),
        "truncated supported_versions extension",
    ),
}


def outcome(data: bytes) -> ClientHello | str | None:
    """What L{peek} says: a hello, a refusal's reason, or None for more."""
    try:
        return peek(data)
    except InvalidClientHello as refusal:
        return str(refusal)


@pytest.mark.parametrize(("data", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(data: bytes, reason: str) -> None:
    """
    Refused with its reason; and once a prefix is refused, every longer one
    is, for the same reason (a decision never changes with more bytes).
    """
    outcomes = [outcome(data[:end]) for end in range(len(data) + 1)]
    refused = outcomes.index(reason) if reason in outcomes else len(outcomes)
    assert outcomes == [None] * refused + [reason] * (len(outcomes) - refused)


#: The length of a hello up to its extensions block.
BEFORE_EXTENSIONS = len(hello())

EARLY = {
    "HTTP at its first byte": (b"G", "not a TLS handshake record"),
    "SSLv2 at its first byte": (b"\x80", "SSLv2 ClientHello is not supported"),
    "record length from its first byte": (b"\x16\x03\x01\x41", "record length above 16384"),
    "hello length from its first byte": (b"\x16\x03\x01\x40\x00\x01\x01", f"ClientHello above {MAX_HELLO} bytes"),
    "hello length before the hello": (
        b"\x16\x03\x01\x40\x00\x01" + u24(MAX_HELLO + 1),
        f"ClientHello above {MAX_HELLO} bytes",
    ),
    "session id before its bytes": (
        hello(session_id=vec8(bytes(33)))[: 5 + 4 + 2 + 32 + 1],  # headers, version, random, length
        "session id above 32 bytes",
    ),
    "extension overrun before its bytes": (
        hello(exts(extension(1, b"", 0x1000), b"x" * 40))[: BEFORE_EXTENSIONS + 2 + 4],
        "truncated extensions",
    ),
    "server_name before the rest": (
        hello(exts(sni(b"a b"), extension(0x1234, bytes(200))))[: BEFORE_EXTENSIONS + 2 + len(sni(b"a b"))],
        "server_name: label not made of letters, digits and inner hyphens",
    ),
}


@pytest.mark.parametrize(("prefix", "reason"), EARLY.values(), ids=EARLY.keys())
def test_refused_early(prefix: bytes, reason: str) -> None:
    """Refused at the byte that makes the hello invalid, not after buffering the rest."""
    assert outcome(prefix[:-1]) is None
    assert outcome(prefix) == reason


# -- properties --------------------------------------------------------------

real_data = [data for data, _ in REAL_HELLOS.values()]

#: Random bytes: bare, and as the body of a well-framed hello, so that the
#: body's fields are reached.
random_inputs = st.binary(max_size=600) | st.binary(max_size=600).map(
    lambda body: framed(b"\x01" + u24(len(body)) + body)
)


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    """A real hello with bytes changed, inserted or removed."""
    data = bytearray(draw(st.sampled_from(real_data)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        value = draw(st.integers(0, 255))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "replace":
            data[position] = value
        elif action == "insert":
            data.insert(position, value)
        else:
            del data[position]
    return bytes(data)


def fed(data: bytes, cuts: Iterable[int]) -> ClientHello | str | None:
    """What a L{HelloReader} says, fed C{data} in pieces cut at C{cuts} until it answers."""
    reader = HelloReader()
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    try:
        for start, end in zip(bounds, bounds[1:]):
            answer = reader.feed(data[start:end])
            if answer is not None:
                return answer
    except InvalidClientHello as refusal:
        return str(refusal)
    return None


@SETTINGS
@given(data=random_inputs | mutated_hellos(), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_any_input(data: bytes, cuts: list[int]) -> None:
    """
    Nothing but InvalidClientHello is raised; an answer given for a prefix
    is the answer for the whole; a reader fed the bytes in any pieces gives
    the same answer.
    """
    whole = outcome(data)
    assert whole is None or isinstance(whole, (ClientHello, str))
    for cut in cuts:
        decided = outcome(data[: cut % (len(data) + 1)])
        assert decided is None or decided == whole
    assert fed(data, cuts) == whole


@SETTINGS
@given(
    source=st.sampled_from(list(REAL_HELLOS.values())),
    sizes=st.lists(st.integers(1, 600), min_size=1, max_size=8),
    split=st.integers(0, 100_000),
)
def test_any_framing(source: tuple[bytes, ClientHello], sizes: list[int], split: int) -> None:
    """However the hello is split into records, a strict prefix asks for more."""
    data, expected = source
    reframed = framed(unframe(data), sizes)
    assert peek(reframed[: split % len(reframed)]) is None
    assert peek(reframed) == expected


# -- NameTable ---------------------------------------------------------------

TABLE = NameTable(
    [
        ("db.example.org", "db"),
        ("*.Example.org", "example"),
        ("*.eu.example.org.", "eu"),
        ("example.org", "apex"),
        ("*", "default"),
    ]
)


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        ("db.example.org", "db"),
        ("DB.Example.ORG", "db"),
        ("www.example.org", "example"),
        ("a.b.example.org", "example"),
        ("eu.example.org", "example"),
        ("x.eu.example.org", "eu"),
        ("a.b.eu.example.org", "eu"),
        ("example.org", "apex"),
        ("xexample.org", "default"),
        ("org", "default"),
        ("other.example", "default"),
        (None, "default"),
    ],
)
def test_lookup(server_name: str | None, expected: str) -> None:
    """Exact first, then the longest wildcard, then the default."""
    assert TABLE.lookup(server_name) == expected


def test_lookup_without_default() -> None:
    table = NameTable([("*.example.org", 1)])
    names = ("a.example.org", "example.org", "a.example.net", None)
    assert [table.lookup(name) for name in names] == [1, None, None, None]


def test_lookup_of_a_peeked_name() -> None:
    data, _ = REAL_HELLOS["pyopenssl-trailing-dot"]
    hello = peek(data)
    assert hello is not None
    assert NameTable([("mail.example.org", "mail"), ("*", "default")]).lookup(hello.server_name) == "mail"


@pytest.mark.parametrize(
    ("patterns", "duplicate"),
    [
        (["db.example.org", "DB.example.org."], "'db.example.org'"),
        (["*.example.org", "*.EXAMPLE.org"], "'*.example.org'"),
        (["*", "a.example", "*"], "'*'"),
    ],
)
def test_duplicate_patterns(patterns: list[str], duplicate: str) -> None:
    with pytest.raises(ValueError) as caught:
        NameTable((pattern, index) for index, pattern in enumerate(patterns))
    assert str(caught.value) == f"duplicate server name pattern {duplicate}"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("Example.ORG.", "example.org"),
        ("*.Example.org", "*.example.org"),
        ("*", "*"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.c0.d", "a-b.c0.d"),
    ],
)
def test_normalize(pattern: str, expected: str) -> None:
    assert NameTable.normalize(pattern) == expected


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "empty"),
        (".", "empty"),
        ("a..example", "empty label"),
        (".a.example", "empty label"),
        ("a b.example", "label not made of letters, digits and inner hyphens"),
        ("a_b.example", "label not made of letters, digits and inner hyphens"),
        ("a-.example", "label not made of letters, digits and inner hyphens"),
        ("*example.org", "'*' other than as the whole first label"),
        ("a.*.org", "'*' other than as the whole first label"),
        ("*.*.org", "'*' other than as the whole first label"),
        ("**.org", "'*' other than as the whole first label"),
        ("bücher.example", "not ASCII"),
        ("\u212a.example", "not ASCII"),  # KELVIN SIGN, which lower() makes "k"
        (long_label(64).decode(), "label longer than 63 characters"),
        ("a." * 126 + "bc", "longer than 253 characters"),
    ],
)
def test_normalize_refuses(pattern: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        NameTable.normalize(pattern)
    assert str(caught.value) == problem
    with pytest.raises(ValueError):
        NameTable([(pattern, None)])
