"""
Property tests for L{streamrelay.proxyproto}: built headers parse back to
what was built, and no input, however broken, makes the parser raise
anything but L{InvalidProxyHeader} or claim bytes it was not given.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from streamrelay.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    V1_SIGNATURE,
    V2_SIGNATURE,
    InvalidProxyHeader,
    ProxyInfo,
    SSLInfo,
    build_v1,
    build_v2,
    parse,
    tls_tlvs,
)
from streamrelay.proxyproto.info import canonical_host

SETTINGS = settings(max_examples=200, deadline=None)

ports = st.integers(min_value=0, max_value=0xFFFF)
#: What follows a header on the wire; it must never change the result.
payloads = st.binary(max_size=40) | st.sampled_from([V1_SIGNATURE, V2_SIGNATURE, b"\r\n", b"GET / HTTP/1.1\r\n"])


@st.composite
def endpoint_pairs(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    """
    Two endpoints of the same IP version, hosts in any textual form the
    builders accept (IPv6 compressed, exploded or upper case).
    """
    version = draw(st.sampled_from([4, 6]))

    def host() -> str:
        address = draw(st.ip_addresses(v=version))
        if version == 4:
            return str(address)
        return draw(st.sampled_from([str(address), address.exploded, address.exploded.upper()]))

    return (host(), draw(ports)), (host(), draw(ports))


def canonical(endpoint: tuple[str, int]) -> tuple[str, int]:
    return canonical_host(ipaddress.ip_address(endpoint[0])), endpoint[1]


#: TLVs of any type whose value the parser does not check.
tlv_lists = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=0xFF).filter(
            lambda kind: kind not in (PP2_TYPE_CRC32C, PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_SSL)
        ),
        st.binary(max_size=64),
    ),
    max_size=6,
)

#: Text in any script (no lone surrogates: they have no UTF-8 form).
utf8_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)
ascii_text = st.text(st.characters(max_codepoint=0x7F), min_size=1, max_size=30)


@st.composite
def ssl_infos(draw: st.DrawFn) -> SSLInfo:
    """
    Any TLS facts L{SSLInfo} accepts.
    """
    if not draw(st.booleans()):
        return SSLInfo(client_ssl=False)
    conn, sess = draw(st.booleans()), draw(st.booleans())
    optional_ascii = st.none() | ascii_text
    return SSLInfo(
        client_ssl=True,
        client_cert_conn=conn,
        client_cert_sess=sess,
        verified=(conn or sess) and draw(st.booleans()),
        version=draw(ascii_text),
        cipher=draw(optional_ascii),
        sig_alg=draw(optional_ascii),
        key_alg=draw(optional_ascii),
        cn=draw(st.none() | utf8_text),
    )


#: Keyword arguments for L{tls_tlvs}.
tls_facts = st.fixed_dictionaries(
    {"authority": st.none() | utf8_text, "alpn": st.none() | utf8_text, "ssl": st.none() | ssl_infos()}
)


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    """
    Any header the builders produce, v1 or v2.
    """
    endpoints = draw(st.none() | endpoint_pairs())
    source, destination = endpoints or (None, None)
    if draw(st.booleans()):
        return build_v1(source, destination)
    return build_v2(
        source,
        destination,
        command=draw(st.sampled_from(["PROXY", "LOCAL"])),
        transport=draw(st.sampled_from(["TCP", "UDP"])),
        tlvs=tls_tlvs(**draw(tls_facts)) + draw(tlv_lists),
        crc32c=draw(st.booleans()),
    )


def outcome(data: bytes) -> tuple[ProxyInfo, int] | str | None:
    """
    What parse() makes of C{data}, failing the test on anything but
    L{InvalidProxyHeader} or a result that claims bytes beyond C{data}.
    """
    try:
        result = parse(data, allow_udp=True)
    except InvalidProxyHeader as error:
        assert str(error)
        return "invalid"
    if result is not None:
        info, length = result
        assert 0 < length <= len(data)
        # What parse() accepts, the properties decode.
        assert (info.alpn, info.authority, info.ssl, info.vendor) is not None
    return result


# ------------------------------------------------------------------ round trip


@SETTINGS
@given(endpoints=st.none() | endpoint_pairs(), payload=payloads)
def test_v1_round_trip(endpoints, payload: bytes) -> None:
    source, destination = endpoints or (None, None)
    header = build_v1(source, destination)
    if endpoints is None:
        expected = ProxyInfo(1, "UNKNOWN", "UNSPEC", None, None)
    else:
        expected = ProxyInfo(1, "PROXY", "TCP", canonical(source), canonical(destination))
    assert parse(header + payload) == (expected, len(header))


@SETTINGS
@given(
    endpoints=st.none() | endpoint_pairs(),
    command=st.sampled_from(["PROXY", "LOCAL"]),
    transport=st.sampled_from(["TCP", "UDP"]),
    tlvs=tlv_lists,
    crc=st.booleans(),
    payload=payloads,
)
def test_v2_round_trip(endpoints, command: str, transport: str, tlvs, crc: bool, payload: bytes) -> None:
    source, destination = endpoints or (None, None)
    header = build_v2(source, destination, command=command, transport=transport, tlvs=tlvs, crc32c=crc)
    info, consumed = parse(header + payload, allow_udp=True)
    assert consumed == len(header)
    assert (info.version, info.command) == (2, command)
    if command == "PROXY" and endpoints is not None:
        assert (info.transport, info.source, info.destination) == (transport, canonical(source), canonical(destination))
    else:
        assert (info.transport, info.source, info.destination) == ("UNSPEC", None, None)
    assert info.tlvs[: len(tlvs)] == tuple(tlvs)
    assert [kind for kind, _ in info.tlvs[len(tlvs) :]] == ([PP2_TYPE_CRC32C] if crc else [])


@SETTINGS
@given(facts=tls_facts, others=tlv_lists, crc=st.booleans())
def test_tls_tlvs_round_trip(facts: dict, others: list[tuple[int, bytes]], crc: bool) -> None:
    """
    Whatever TLS facts the relay has, the header built from them says the
    same to a receiver, among any other TLVs.
    """
    header = build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=tls_tlvs(**facts) + others, crc32c=crc)
    info, _ = parse(header)
    assert (info.authority, info.alpn, info.ssl) == (facts["authority"], facts["alpn"], facts["ssl"])


# --------------------------------------------------------------- robustness


#: Lines shaped like v1 headers, so that fuzzing reaches the field checks.
v1_like = st.from_regex(
    r"\APROXY (TCP4|TCP6|UNKNOWN)( ([0-9]{1,6}|[0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F:.%]{2,40})){0,5}\r?\n?",
    fullmatch=True,
).map(str.encode)
#: Binary headers with plausible fixed parts and a declared length close to
#: the bytes that follow, so that fuzzing reaches the TLVs.
v2_like = st.builds(
    lambda command, family, body, slack: (
        V2_SIGNATURE + bytes([command, family]) + max(len(body) - slack, 0).to_bytes(2, "big") + body
    ),
    st.sampled_from([0x20, 0x21]),
    st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22]),
    st.binary(min_size=12, max_size=100),
    st.integers(min_value=-2, max_value=8),
)


@st.composite
def spliced_headers(draw: st.DrawFn) -> bytes:
    """
    A valid header with a random slice replaced by random bytes.
    """
    header = draw(valid_headers())
    start = draw(st.integers(min_value=0, max_value=len(header)))
    end = draw(st.integers(min_value=start, max_value=min(len(header), start + 8)))
    return header[:start] + draw(st.binary(max_size=8)) + header[end:]


@SETTINGS
@given(
    data=st.binary(max_size=160)
    | st.builds(bytes.__add__, st.sampled_from([V1_SIGNATURE, V2_SIGNATURE]), st.binary(max_size=160))
    | v1_like
    | v2_like
    | spliced_headers()
)
def test_arbitrary_bytes(data: bytes) -> None:
    """
    Every prefix of any input is incomplete, refused or parsed, and the
    answers are consistent as bytes arrive: once refused, always refused;
    once parsed, the same result whatever follows.
    """
    outcomes = [outcome(data[:size]) for size in range(len(data) + 1)]
    for shorter, longer in zip(outcomes, outcomes[1:]):
        if shorter is not None:
            assert longer == shorter


@SETTINGS
@given(header=valid_headers(), payload=payloads)
def test_every_prefix_is_incomplete(header: bytes, payload: bytes) -> None:
    result = parse(header, allow_udp=True)
    assert result is not None and result[1] == len(header)
    assert [outcome(header[:size]) for size in range(len(header))] == [None] * len(header)
    assert outcome(header + payload) == result


@SETTINGS
@given(header=valid_headers(), payload=payloads, data=st.data())
def test_bit_flips(header: bytes, payload: bytes, data: st.DataObject) -> None:
    """
    A corrupted header is refused, incomplete, or parsed within its bytes;
    corrupted payload after a header changes nothing.
    """
    stream = bytearray(header + payload)
    position = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
    stream[position] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    result = outcome(bytes(stream))
    if position >= len(header):
        assert result == parse(header, allow_udp=True)
