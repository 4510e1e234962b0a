"""
Tests for L{streamrelay.proxyproto.parser}: tables of valid and malformed
headers (go-proxyproto's v1_test.go and v2_test.go cases are all here, plus
the spec's corner cases), incremental parsing, early refusal and detection.

The v2 fixtures are written out byte by byte rather than with the builder,
so a bug shared by the builder and the parser cannot hide here.
"""

from __future__ import annotations

import dataclasses

import crc32c
import pytest

from streamrelay.proxyproto import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V1_SIGNATURE,
    V2_SIGNATURE,
    Detection,
    InvalidProxyHeader,
    ProxyInfo,
    SSLInfo,
    detect,
    parse,
)

PAYLOAD = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"

LOCALHOST4 = bytes([127, 0, 0, 1])
DOC6 = bytes.fromhex("20010db8000000000000000000000001")  # 2001:db8::1
LOOPBACK6 = bytes(15) + b"\x01"
MAPPED6 = bytes(10) + b"\xff\xff" + bytes([1, 2, 3, 4])  # ::ffff:1.2.3.4
PORTS = (56324).to_bytes(2, "big") + (443).to_bytes(2, "big")
ADDRESSES4 = LOCALHOST4 + bytes([10, 0, 0, 1]) + PORTS
ADDRESSES6 = DOC6 + LOOPBACK6 + PORTS

#: The spec's longest v1 line: exactly MAX_V1_LENGTH bytes.
LONGEST_V1 = b"PROXY UNKNOWN " + b" ".join([b"ffff:" * 7 + b"ffff"] * 2) + b" 65535 65535\r\n"


def v2(command: int, family: int, body: bytes = b"", length: int | None = None) -> bytes:
    """
    A v2 header: C{command} is the whole version/command byte, C{length}
    defaults to the length of C{body}.
    """
    declared = len(body) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + declared.to_bytes(2, "big") + body


def tlv(kind: int, value: bytes, length: int | None = None) -> bytes:
    return bytes([kind]) + (len(value) if length is None else length).to_bytes(2, "big") + value


def with_crc32c(command: int, family: int, body: bytes) -> bytes:
    """
    A v2 header whose last TLV is a correct CRC32C, computed as section
    2.2.3 says.
    """
    zeroed = v2(command, family, body + tlv(0x03, bytes(4)))
    return zeroed[:-4] + crc32c.crc32c(zeroed).to_bytes(4, "big")


def proxy(version: int, source: tuple[str, int], destination: tuple[str, int], **fields: object) -> ProxyInfo:
    return dataclasses.replace(ProxyInfo(version, "PROXY", "TCP", source, destination), **fields)


CRC_TCP4 = with_crc32c(0x21, 0x11, ADDRESSES4)
V1_UNKNOWN_INFO = ProxyInfo(1, "UNKNOWN", "UNSPEC", None, None)
V2_LOCAL_INFO = ProxyInfo(2, "LOCAL", "UNSPEC", None, None)
SSL_TLV = tlv(0x20, b"\x07\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client"))
VERSION = tlv(0x21, b"TLSv1.3")


def tcp4(tlvs: bytes) -> bytes:
    """A v2 PROXY header for TCP over IPv4 carrying C{tlvs}."""
    return v2(0x21, 0x11, ADDRESSES4 + tlvs)


def ssl_tlv(client: int, *subtlvs: bytes, verify: int = 0) -> bytes:
    """A PP2_TYPE_SSL TLV: the client bits, verify, then sub-TLVs."""
    return tlv(0x20, bytes([client]) + verify.to_bytes(4, "big") + b"".join(subtlvs))


# Headers real senders sent, byte for byte.
#: HAProxy, send-proxy-v2-ssl-cn, a client certificate that verified
#: (go-proxyproto, tlvparse/ssl_test.go, "SSL haproxy cn").
HAPROXY_SSL_CN = bytes.fromhex(
    "0d0a0d0a000d0a515549540a211100407f0000017f000001cc8a232e2000310700000000210007544c5376312e3322001f"
    "4578616d706c6520436f6d6d6f6e204e616d6520436c69656e742043657274"
)
#: HAProxy, proxy-v2-options ssl-cipher, no client certificate, IPv4-mapped
#: addresses (go-proxyproto, tlvparse/ssl_test.go, "SSL haproxy cipher").
HAPROXY_SSL_CIPHER = bytes.fromhex(
    "0d0a0d0a000d0a515549540a2121004f00000000000000000000ffff0a015b0e00000000000000000000ffff0a01019f"
    "f47c01bb2000280100000000210007544c5376312e33230016544c535f4145535f3235365f47434d5f534841333834"
)
#: An AWS Network Load Balancer behind a PrivateLink endpoint service:
#: CRC32C, the endpoint id, NOOP padding (AWS's elastic-load-balancing-tools,
#: proprot/tst/.../Compatibility_AwsNetworkLoadBalancerTest.java, as quoted
#: in go-proxyproto's tlvparse/aws_test.go).
AWS_VPCE = bytes.fromhex(
    "0d0a0d0a000d0a515549540a21110054ac1f0771ac1f0a1fc8f20050030004e8d6892dea001701767063652d30386432"
    "62663135666163353030316339040024"
) + bytes(36)
#: Google Private Service Connect: the tcpdump in Google's PSC codelab
#: ("Enable Proxy Protocol"), pscConnectionId 43686719580552292.
GCP_PSC = bytes.fromhex("0d0a0d0a000d0a515549540a211100170a003c020a003c6481380050e00008009b34d70a003c64")

VALID = [
    # -- v1
    pytest.param(
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        proxy(1, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        id="v1-spec-example",
    ),
    pytest.param(b"PROXY TCP4 1.1.1.5 1.1.1.6 2 3\r\n", proxy(1, ("1.1.1.5", 2), ("1.1.1.6", 3)), id="v1-tcp4-minimal"),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 255.255.255.254 65535 65535\r\n",
        proxy(1, ("255.255.255.255", 65535), ("255.255.255.254", 65535)),
        id="v1-tcp4-maximal",
    ),
    pytest.param(b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", proxy(1, ("0.0.0.0", 0), ("10.0.0.1", 0)), id="v1-port-zero"),
    pytest.param(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n", proxy(1, ("2001:db8::1", 1), ("::1", 2)), id="v1-tcp6"),
    pytest.param(
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 0:0:0:0:0:0:0:1 1 2\r\n",
        proxy(1, ("2001:db8::1", 1), ("::1", 2)),
        id="v1-tcp6-canonicalised",
    ),
    pytest.param(
        b"PROXY TCP6 ::ffff:127.0.0.1 ::FFFF:7F00:1 80 81\r\n",
        proxy(1, ("::ffff:127.0.0.1", 80), ("::ffff:127.0.0.1", 81)),
        id="v1-tcp6-ipv4-mapped",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", V1_UNKNOWN_INFO, id="v1-unknown"),
    pytest.param(
        b"PROXY UNKNOWN 127.0.0.1 127.0.0.1 65536 65536\r\n", V1_UNKNOWN_INFO, id="v1-unknown-ignores-the-rest"
    ),
    pytest.param(b"PROXY UNKNOWN  anything  goes\r\n", V1_UNKNOWN_INFO, id="v1-unknown-anything"),
    pytest.param(LONGEST_V1, V1_UNKNOWN_INFO, id="v1-longest"),
    # -- v2
    pytest.param(
        v2(0x21, 0x11, ADDRESSES4), proxy(2, ("127.0.0.1", 56324), ("10.0.0.1", 443)), id="v2-proxy-tcp4"
    ),
    pytest.param(v2(0x21, 0x21, ADDRESSES6), proxy(2, ("2001:db8::1", 56324), ("::1", 443)), id="v2-proxy-tcp6"),
    pytest.param(
        v2(0x21, 0x21, MAPPED6 + MAPPED6 + PORTS),
        proxy(2, ("::ffff:1.2.3.4", 56324), ("::ffff:1.2.3.4", 443)),
        id="v2-proxy-tcp6-ipv4-mapped",
    ),
    pytest.param(v2(0x20, 0x00), V2_LOCAL_INFO, id="v2-local-unspec"),
    # LOCAL: the spec says to discard the address block "including the
    # family", so a family this parser does not decode is skipped whole.
    pytest.param(v2(0x20, 0x01), V2_LOCAL_INFO, id="v2-local-unspec-stream"),
    pytest.param(v2(0x20, 0x41, ADDRESSES4 + tlv(0x04, b"")), V2_LOCAL_INFO, id="v2-local-unassigned-family"),
    pytest.param(v2(0x20, 0x31, bytes(216)), V2_LOCAL_INFO, id="v2-local-unix"),
    pytest.param(v2(0x20, 0x12, ADDRESSES4), V2_LOCAL_INFO, id="v2-local-udp-on-tcp"),
    pytest.param(v2(0x20, 0x11, ADDRESSES4), V2_LOCAL_INFO, id="v2-local-ignores-addresses"),
    pytest.param(
        v2(0x20, 0x21, ADDRESSES6 + tlv(0x04, b"")),
        dataclasses.replace(V2_LOCAL_INFO, tlvs=((0x04, b""),)),
        id="v2-local-ignores-addresses-keeps-tlvs",
    ),
    pytest.param(
        v2(0x20, 0x00, tlv(0x05, b"id-1") + tlv(0x04, b"")),
        dataclasses.replace(V2_LOCAL_INFO, tlvs=((0x05, b"id-1"), (0x04, b""))),
        id="v2-local-with-tlvs",
    ),
    pytest.param(v2(0x21, 0x00), ProxyInfo(2, "PROXY", "UNSPEC", None, None), id="v2-proxy-unspec"),
    pytest.param(
        v2(0x21, 0x00, tlv(0x02, b"example.com")),
        ProxyInfo(2, "PROXY", "UNSPEC", None, None, ((0x02, b"example.com"),)),
        id="v2-proxy-unspec-with-tlv",
    ),
    pytest.param(
        v2(0x21, 0x11, ADDRESSES4 + tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, bytes(5)) + SSL_TLV),
        proxy(
            2,
            ("127.0.0.1", 56324),
            ("10.0.0.1", 443),
            tlvs=((0x01, b"h2"), (0x02, b"example.com"), (0x04, bytes(5)), (0x20, SSL_TLV[3:])),
        ),
        id="v2-tcp4-tlvs-in-order-ssl-raw",
    ),
    pytest.param(
        v2(0x21, 0x11, ADDRESSES4 + bytes(72)),
        proxy(2, ("127.0.0.1", 56324), ("10.0.0.1", 443), tlvs=((0, b""),) * 24),
        id="v2-tcp4-zero-padding-is-empty-tlvs",
    ),
    pytest.param(
        v2(0x21, 0x11, ADDRESSES4 + tlv(0x05, bytes(128))),
        proxy(2, ("127.0.0.1", 56324), ("10.0.0.1", 443), tlvs=((0x05, bytes(128)),)),
        id="v2-longest-unique-id",
    ),
    pytest.param(
        v2(0x21, 0x11, ADDRESSES4 + tlv(0x04, bytes(MAX_V2_LENGTH - 16 - 12 - 3))),
        proxy(2, ("127.0.0.1", 56324), ("10.0.0.1", 443), tlvs=((0x04, bytes(MAX_V2_LENGTH - 31)),)),
        id="v2-longest",
    ),
    pytest.param(
        with_crc32c(0x21, 0x11, ADDRESSES4 + tlv(0x05, b"abc")),
        proxy(
            2,
            ("127.0.0.1", 56324),
            ("10.0.0.1", 443),
            tlvs=((0x05, b"abc"), (0x03, with_crc32c(0x21, 0x11, ADDRESSES4 + tlv(0x05, b"abc"))[-4:])),
        ),
        id="v2-crc32c",
    ),
    pytest.param(
        with_crc32c(0x20, 0x00, b""),
        dataclasses.replace(V2_LOCAL_INFO, tlvs=((0x03, with_crc32c(0x20, 0x00, b"")[-4:]),)),
        id="v2-local-crc32c",
    ),
    # -- captured from real senders
    pytest.param(
        HAPROXY_SSL_CN,
        proxy(2, ("127.0.0.1", 52362), ("127.0.0.1", 9006), tlvs=((0x20, HAPROXY_SSL_CN[31:]),)),
        id="v2-haproxy-ssl-cn",
    ),
    pytest.param(
        HAPROXY_SSL_CIPHER,
        proxy(2, ("::ffff:10.1.91.14", 62588), ("::ffff:10.1.1.159", 443), tlvs=((0x20, HAPROXY_SSL_CIPHER[55:]),)),
        id="v2-haproxy-ssl-cipher",
    ),
    pytest.param(
        AWS_VPCE,
        proxy(
            2,
            ("172.31.7.113", 51442),
            ("172.31.10.31", 80),
            tlvs=((0x03, AWS_VPCE[31:35]), (0xEA, b"\x01vpce-08d2bf15fac5001c9"), (0x04, bytes(36))),
        ),
        id="v2-aws-vpce",
    ),
    pytest.param(
        GCP_PSC,
        proxy(2, ("10.0.60.2", 33080), ("10.0.60.100", 80), tlvs=((0xE0, GCP_PSC[-8:]),)),
        id="v2-gcp-psc",
    ),
]


@pytest.mark.parametrize("header, expected", VALID)
def test_valid(header: bytes, expected: ProxyInfo) -> None:
    assert parse(header) == (expected, len(header))


@pytest.mark.parametrize("header, expected", VALID)
def test_payload_is_not_consumed(header: bytes, expected: ProxyInfo) -> None:
    assert parse(header + PAYLOAD) == (expected, len(header))
    # Payload that looks like another header changes nothing either.
    assert parse(header + header) == (expected, len(header))


@pytest.mark.parametrize("header, expected", VALID)
def test_byte_by_byte(header: bytes, expected: ProxyInfo) -> None:
    """
    A header that arrives in pieces is incomplete until its last byte.
    """
    assert [parse(header[:size]) for size in range(len(header))] == [None] * len(header)
    assert parse(header) == (expected, len(header))


def test_bytearray_is_accepted() -> None:
    header = b"PROXY TCP4 1.1.1.5 1.1.1.6 2 3\r\n"
    assert parse(bytearray(header + PAYLOAD)) == parse(header)
    assert parse(bytearray(v2(0x21, 0x11, ADDRESSES4))) == parse(v2(0x21, 0x11, ADDRESSES4))


@pytest.mark.parametrize("family, addresses, version", [(0x12, ADDRESSES4, 4), (0x22, ADDRESSES6, 6)])
def test_udp_needs_allow_udp(family: int, addresses: bytes, version: int) -> None:
    header = v2(0x21, family, addresses)
    with pytest.raises(InvalidProxyHeader, match="UDP is not allowed"):
        parse(header)
    info, consumed = parse(header, allow_udp=True)
    assert (info.transport, info.family, consumed) == ("UDP", version, len(header))


# ------------------------------------------------------------------ malformed

MALFORMED = [
    # -- no signature (go: "no signature", "prox", "truncated v2 signature")
    pytest.param(b"GET / HTTP/1.1\r\n", "no PROXY protocol signature", id="http"),
    pytest.param(b"\x16\x03\x01\x02\x00", "no PROXY protocol signature", id="tls-client-hello"),
    pytest.param(b"PROX\r\n", "no PROXY protocol signature", id="prox"),
    pytest.param(b"PROXY\r\n", "no PROXY protocol signature", id="proxy-no-space"),
    pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY protocol signature", id="v1-lowercase"),
    pytest.param(V2_SIGNATURE[2:] + b"\x21\x11\x00\x0c", "no PROXY protocol signature", id="v2-truncated-signature"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIT\r", "no PROXY protocol signature", id="v2-wrong-signature"),
    # -- v1 line structure (go: "proxy lf", "proxy crlf", "proxy something crlf")
    pytest.param(b"PROXY \n", "bare LF", id="v1-proxy-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF", id="v1-lf-only"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CR not followed by LF", id="v1-cr-only"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "CR not followed by LF", id="v1-cr-cr-lf"),
    pytest.param(b"PROXY UNKNOWN\n\r\n", "bare LF", id="v1-unknown-lf"),
    pytest.param(b"PROXY \r\n", "empty field", id="v1-proxy-crlf"),
    pytest.param(b"PROXY SOMETHING\r\n", "TCP4, TCP6 or UNKNOWN", id="v1-unknown-protocol"),
    pytest.param(b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN", id="v1-lowercase-protocol"),
    pytest.param(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN", id="v1-udp"),
    pytest.param(b"PROXY UNKNOWNX\r\n", "TCP4, TCP6 or UNKNOWN", id="v1-unknown-prefix"),
    pytest.param(b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "empty field", id="v1-double-space-after-proxy"),
    pytest.param(b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "empty field", id="v1-double-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "empty field", id="v1-trailing-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "missing fields", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4\r\n", "missing fields", id="v1-protocol-only"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "too many fields", id="v1-extra-field"),
    pytest.param(b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "invalid byte 0x09", id="v1-tab"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n", "invalid byte 0x00", id="v1-nul"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \x7f\r\n", "invalid byte 0x7f", id="v1-del"),
    pytest.param(b"PROXY UNKNOWN \xff\r\n", "invalid byte 0xff", id="v1-unknown-non-ascii"),
    pytest.param("PROXY TCP4 1.2.3.4 5.6.7.8 1 ٣\r\n".encode(), "invalid byte 0xd9", id="v1-non-ascii-digit"),
    # -- v1 length (go: "header too long", "incomplete signature TCP4" at EOF)
    pytest.param(LONGEST_V1[:-2] + b"f\r\n", "no CRLF within 107 bytes", id="v1-108-bytes"),
    pytest.param(
        b"PROXY UNKNOWN " + b" ".join([b"ffff:" * 6 + b"255.255.255.255"] * 2) + b" 65535 65535 \r\n",
        "no CRLF within 107 bytes",
        id="v1-go-header-too-long",
    ),
    pytest.param(
        b"PROXY TCP6 " + b" ".join([b"ffff:" * 6 + b"255.255.255.255"] * 2) + b" 1 2\r\n",
        "no CRLF within 107 bytes",
        id="v1-valid-fields-too-long",
    ),
    # -- v1 addresses (go: "invalid IP address", "TCP6 with IPv4 addresses", ...)
    pytest.param(b"PROXY TCP4 invalid invalid 65533 65533\r\n", "invalid IPv4 address", id="v1-not-an-address"),
    pytest.param(b"PROXY TCP4 localhost 1.2.3.4 1 2\r\n", "invalid IPv4 address", id="v1-hostname"),
    pytest.param(b"PROXY TCP6 localhost ::1 1 2\r\n", "invalid IPv6 address", id="v1-hostname-tcp6"),
    pytest.param(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "IPv4 address in a TCP6 header", id="v1-tcp6-with-ipv4"),
    pytest.param(b"PROXY TCP4 ::1 ::1 1 2\r\n", "IPv6 address in a TCP4 header", id="v1-tcp4-with-ipv6"),
    pytest.param(
        b"PROXY TCP4 ::ffff:127.0.0.1 ::ffff:127.0.0.1 1 2\r\n",
        "IPv6 address in a TCP4 header",
        id="v1-tcp4-with-ipv4-mapped",
    ),
    pytest.param(b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "IPv6 address in a TCP4 header", id="v1-mixed-families"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "invalid IPv4 address", id="v1-octet-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "invalid IPv4 address", id="v1-three-octets"),
    pytest.param(b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "invalid IPv4 address", id="v1-five-octets"),
    pytest.param(b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n", "invalid IPv4 address", id="v1-octet-overflow"),
    pytest.param(b"PROXY TCP4 0x7f.0.0.1 5.6.7.8 1 2\r\n", "invalid IPv4 address", id="v1-hex-octet"),
    pytest.param(b"PROXY TCP4 2130706433 5.6.7.8 1 2\r\n", "invalid IPv4 address", id="v1-integer-address"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "zone ids", id="v1-zone-id"),
    pytest.param(b"PROXY TCP6 [::1] ::1 1 2\r\n", "invalid IPv6 address", id="v1-bracketed-ipv6"),
    pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "invalid IPv6 address", id="v1-nine-groups"),
    pytest.param(b"PROXY TCP6 ::1::2 ::1 1 2\r\n", "invalid IPv6 address", id="v1-two-double-colons"),
    pytest.param(b"PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n", "invalid IPv6 address", id="v1-mapped-leading-zero"),
    # -- v1 ports (go: "TCP4 with invalid port")
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 65536\r\n", "port out of range", id="v1-port-65536"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 100000\r\n", "port out of range", id="v1-port-six-digits"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "port out of range", id="v1-port-99999"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 1\r\n", "port has a leading zero", id="v1-port-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 00 1\r\n", "port has a leading zero", id="v1-port-00"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 000000000001 1\r\n", "leading zero", id="v1-port-many-zeros"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 1\r\n", "not a decimal number", id="v1-port-plus"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 1\r\n", "not a decimal number", id="v1-port-negative"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 1\r\n", "not a decimal number", id="v1-port-hex"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1_000 1\r\n", "not a decimal number", id="v1-port-underscore"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 http 1\r\n", "not a decimal number", id="v1-port-name"),
    # -- v2 version and command (go: "v2 signature with invalid command")
    pytest.param(v2(0x11, 0x11, ADDRESSES4), "unsupported version 1", id="v2-version-1"),
    pytest.param(v2(0x31, 0x11, ADDRESSES4), "unsupported version 3", id="v2-version-3"),
    pytest.param(v2(0x01, 0x11, ADDRESSES4), "unsupported version 0", id="v2-version-0"),
    pytest.param(v2(0x99, 0x11, ADDRESSES4), "unsupported version 9", id="v2-go-invalid-rune"),
    pytest.param(v2(0x22, 0x11, ADDRESSES4), "invalid command 2", id="v2-command-2"),
    pytest.param(v2(0x2F, 0x11, ADDRESSES4), "invalid command 15", id="v2-command-15"),
    # -- v2 family and transport (go: "v2 signature with command and invalid inet family")
    pytest.param(v2(0x21, 0x31, bytes(216)), "AF_UNIX", id="v2-unix-stream"),
    pytest.param(v2(0x21, 0x32, bytes(216)), "AF_UNIX", id="v2-unix-dgram"),
    pytest.param(v2(0x21, 0x41, ADDRESSES4), "invalid address family/transport 0x41", id="v2-family-4"),
    pytest.param(v2(0x21, 0x99, ADDRESSES4), "invalid address family/transport 0x99", id="v2-go-invalid-family"),
    pytest.param(v2(0x21, 0x13, ADDRESSES4), "invalid address family/transport 0x13", id="v2-transport-3"),
    pytest.param(v2(0x21, 0x10, ADDRESSES4), "invalid address family/transport 0x10", id="v2-inet-unspec"),
    pytest.param(v2(0x21, 0x01), "invalid address family/transport 0x01", id="v2-unspec-stream"),
    pytest.param(v2(0x21, 0x12, ADDRESSES4), "UDP is not allowed", id="v2-udp4"),
    pytest.param(v2(0x21, 0x22, ADDRESSES6), "UDP is not allowed", id="v2-udp6"),
    # -- v2 declared length (go: "... with mismatching length", "length zero but with address")
    pytest.param(v2(0x21, 0x11, ADDRESSES6, length=0), "shorter than the 12-byte address block", id="v2-tcp4-length-0"),
    pytest.param(v2(0x21, 0x11, ADDRESSES4[:11]), "shorter than the 12-byte address block", id="v2-tcp4-length-11"),
    pytest.param(v2(0x21, 0x21, ADDRESSES4), "shorter than the 36-byte address block", id="v2-tcp6-ipv4-length"),
    pytest.param(v2(0x20, 0x11, b""), "shorter than the 12-byte address block", id="v2-local-tcp4-length-0"),
    pytest.param(v2(0x21, 0x11, length=60000), "declared length 60000 exceeds", id="v2-length-60000"),
    pytest.param(v2(0x21, 0x11, length=0xFFFF), "declared length 65535 exceeds", id="v2-length-65535"),
    pytest.param(v2(0x20, 0x00, length=MAX_V2_LENGTH - 15), "exceeds", id="v2-length-one-over"),
    pytest.param(v2(0x20, 0x01, length=MAX_V2_LENGTH - 15), "exceeds", id="v2-local-unassigned-family-one-over"),
    # -- v2 TLVs
    pytest.param(v2(0x21, 0x11, ADDRESSES4 + b"\x04\x00"), "truncated TLV", id="v2-tlv-2-bytes"),
    pytest.param(v2(0x21, 0x11, ADDRESSES4 + b"\x04"), "truncated TLV", id="v2-tlv-1-byte"),
    pytest.param(v2(0x21, 0x00, tlv(0x04, b"abcde", length=10)), "TLV overruns", id="v2-tlv-overrun"),
    pytest.param(v2(0x20, 0x11, ADDRESSES4 + b"\x04"), "truncated TLV", id="v2-local-tlv-1-byte"),
    pytest.param(
        v2(0x21, 0x11, ADDRESSES4 + tlv(0x04, b"") + tlv(0x02, b"x" * 7, length=8)), "TLV overruns", id="v2-last-overrun"
    ),
    pytest.param(v2(0x21, 0x11, ADDRESSES4 + tlv(0x05, bytes(129))), "UNIQUE_ID TLV longer", id="v2-unique-id-129"),
    # -- v2 CRC32C
    pytest.param(CRC_TCP4[:-1] + bytes([CRC_TCP4[-1] ^ 1]), "CRC32c mismatch", id="v2-crc32c-wrong"),
    pytest.param(v2(0x21, 0x11, ADDRESSES4 + tlv(0x03, bytes(4))), "CRC32c mismatch", id="v2-crc32c-zero"),
    pytest.param(CRC_TCP4[:16] + b"\x7e" + CRC_TCP4[17:], "CRC32c mismatch", id="v2-crc32c-address-changed"),
    pytest.param(v2(0x21, 0x11, ADDRESSES4 + tlv(0x03, bytes(3))), "must be 4 bytes", id="v2-crc32c-3-bytes"),
    pytest.param(v2(0x21, 0x11, ADDRESSES4 + tlv(0x03, bytes(5))), "must be 4 bytes", id="v2-crc32c-5-bytes"),
    pytest.param(
        v2(0x21, 0x11, ADDRESSES4 + tlv(0x03, bytes(4)) + tlv(0x03, bytes(4))), "duplicate CRC32C", id="v2-crc32c-twice"
    ),
    # -- v2 values of the TLVs ProxyInfo decodes (the checksum is checked first)
    pytest.param(
        with_crc32c(0x21, 0x11, ADDRESSES4 + tlv(0x01, b""))[:-1] + b"\x00", "CRC32c mismatch", id="v2-crc-before-value"
    ),
    pytest.param(with_crc32c(0x21, 0x11, ADDRESSES4 + tlv(0x01, b"")), "ALPN TLV is empty", id="v2-alpn-empty"),
    pytest.param(tcp4(tlv(0x01, b"a" * 256)), "ALPN TLV is longer than 255", id="v2-alpn-256"),
    pytest.param(tcp4(tlv(0x01, b"h\xff")), "ALPN TLV is not utf-8", id="v2-alpn-not-utf8"),
    pytest.param(tcp4(tlv(0x02, b"")), "AUTHORITY TLV is empty", id="v2-authority-empty"),
    pytest.param(tcp4(tlv(0x02, b"a" * 256)), "AUTHORITY TLV is longer than 255", id="v2-authority-256"),
    pytest.param(tcp4(tlv(0x02, b"\xc3(.example")), "AUTHORITY TLV is not utf-8", id="v2-authority-not-utf8"),
    pytest.param(tcp4(tlv(0x20, b"")), "SSL TLV shorter than 5", id="v2-ssl-empty"),
    pytest.param(tcp4(tlv(0x20, b"\x01\x00\x00\x00")), "SSL TLV shorter than 5", id="v2-ssl-4-bytes"),
    pytest.param(tcp4(ssl_tlv(1, VERSION, b"\x22\x00")), "truncated TLV", id="v2-ssl-sub-tlv-cut"),
    pytest.param(
        tcp4(ssl_tlv(1, tlv(0x21, b"TLSv1.3", length=8))), "TLV overruns the SSL TLV", id="v2-ssl-sub-tlv-overrun"
    ),
    pytest.param(tcp4(ssl_tlv(1)), "PP2_CLIENT_SSL without a TLS version", id="v2-ssl-no-version"),
    pytest.param(tcp4(ssl_tlv(1, tlv(0x21, b""))), "SSL version is empty", id="v2-ssl-version-empty"),
    pytest.param(
        tcp4(ssl_tlv(1, tlv(0x21, "TLSv1.3\u00e9".encode()))), "SSL version is not ascii", id="v2-ssl-version-not-ascii"
    ),
    pytest.param(tcp4(ssl_tlv(1, VERSION, tlv(0x23, b"\xff"))), "SSL cipher is not ascii", id="v2-ssl-cipher"),
    pytest.param(tcp4(ssl_tlv(1, VERSION, tlv(0x24, b""))), "signature algorithm is empty", id="v2-ssl-sig-alg"),
    pytest.param(tcp4(ssl_tlv(1, VERSION, tlv(0x25, b"\x80"))), "key algorithm is not ascii", id="v2-ssl-key-alg"),
    pytest.param(tcp4(ssl_tlv(7, VERSION, tlv(0x22, b"\xff"))), "SSL CN is not utf-8", id="v2-ssl-cn"),
    pytest.param(tcp4(ssl_tlv(1, VERSION, tlv(0x21, b""))), "SSL version is empty", id="v2-ssl-later-duplicate"),
    pytest.param(tcp4(ssl_tlv(6)), "TLS facts without PP2_CLIENT_SSL", id="v2-ssl-certificate-without-tls"),
    pytest.param(tcp4(ssl_tlv(0, VERSION)), "TLS facts without PP2_CLIENT_SSL", id="v2-ssl-version-without-tls"),
    pytest.param(tcp4(SSL_TLV + tlv(0x20, b"")), "SSL TLV shorter", id="v2-second-ssl-tlv"),
    pytest.param(v2(0x20, 0x00, tlv(0x20, b"\x01")), "SSL TLV shorter", id="v2-local-ssl"),
]


@pytest.mark.parametrize("data, reason", MALFORMED)
def test_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidProxyHeader) as raised:
        parse(data + PAYLOAD)
    assert reason in str(raised.value)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("data, reason", MALFORMED)
def test_malformed_stays_malformed(data: bytes, reason: str) -> None:
    """
    Once refused, a header cannot become valid with more bytes, and every
    shorter prefix was either refused too or still incomplete.
    """
    outcomes = []
    for size in range(len(data) + 1):
        try:
            outcomes.append(parse(data[:size]))
        except InvalidProxyHeader:
            outcomes.append("invalid")
    first_invalid = outcomes.index("invalid")
    assert outcomes[:first_invalid] == [None] * first_invalid
    assert set(outcomes[first_invalid:]) == {"invalid"}


@pytest.mark.parametrize(
    "prefix, reason",
    [
        # Each of these is refused before the line or header is complete.
        pytest.param(b"G", "no PROXY protocol signature", id="first-byte"),
        pytest.param(b"\r\n\r\n\x00\r\nQ", None, id="v2-partial-signature-is-fine"),
        pytest.param(b"PROXY FOO ", "TCP4, TCP6 or UNKNOWN", id="v1-protocol"),
        pytest.param(b"PROXY TCP4 1.2.3.04 ", "invalid IPv4 address", id="v1-address"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 ", "leading zero", id="v1-port"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", "too many fields", id="v1-sixth-field"),
        pytest.param(b"PROXY TCP4\n", "bare LF", id="v1-lf"),
        pytest.param(b"PROXY \x00", "invalid byte 0x00", id="v1-nul"),
        pytest.param(b"PROXY UNKNOWN" + b"x" * (MAX_V1_LENGTH - 13), "no CRLF", id="v1-107-bytes-without-crlf"),
        pytest.param(V2_SIGNATURE + b"\x11", "unsupported version", id="v2-version"),
        pytest.param(V2_SIGNATURE + b"\x21\x31", "AF_UNIX", id="v2-family"),
        pytest.param(V2_SIGNATURE + b"\x20\x31", None, id="v2-local-any-family-is-fine"),
        pytest.param(V2_SIGNATURE + b"\x21\x11\x00\x0b", "shorter than", id="v2-short-length"),
    ],
)
def test_refused_early(prefix: bytes, reason: str | None) -> None:
    if reason is None:
        assert parse(prefix) is None
        return
    assert parse(prefix[:-1]) is None
    with pytest.raises(InvalidProxyHeader, match=reason):
        parse(prefix)


@pytest.mark.parametrize("length", [60000, 0xFFFF, MAX_V2_LENGTH - 15])
def test_huge_declared_length_refused_after_16_bytes(length: int) -> None:
    """
    The peer cannot make us wait for (and buffer) a 64 KiB header.
    """
    fixed = v2(0x21, 0x11, length=length)
    assert len(fixed) == 16
    assert parse(fixed[:15]) is None
    with pytest.raises(InvalidProxyHeader, match=f"declared length {length} exceeds {MAX_V2_LENGTH - 16}"):
        parse(fixed)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"P", id="p"),
        pytest.param(b"PROXY", id="proxy"),
        pytest.param(b"PROXY ", id="v1-signature"),
        pytest.param(b"PROXY TCP4", id="v1-protocol"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", id="v1-no-crlf"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", id="v1-cr"),
        pytest.param(b"PROXY UNKNOWN anything", id="v1-unknown"),
        pytest.param(LONGEST_V1[:-1], id="v1-106-bytes"),
        pytest.param(b"\r", id="cr"),
        pytest.param(V2_SIGNATURE, id="v2-signature"),
        pytest.param(V2_SIGNATURE + b"\x21", id="v2-command"),
        pytest.param(V2_SIGNATURE + b"\x21\x11\x00", id="v2-half-length"),
        # go: "TCPv4 with mismatching length" (EOF after the fixed part)
        pytest.param(v2(0x21, 0x11, length=12), id="v2-no-addresses-yet"),
        pytest.param(v2(0x21, 0x11, ADDRESSES4 + tlv(0x02, b"abc"))[:-1], id="v2-partial-tlv"),
        # go: "unspec length greater than zero but no TLVs"
        pytest.param(v2(0x20, 0x00, length=7), id="v2-local-tlvs-missing"),
        pytest.param(v2(0x21, 0x11, length=MAX_V2_LENGTH - 16), id="v2-longest-declared"),
    ],
)
def test_incomplete(data: bytes) -> None:
    assert parse(data) is None


def test_crc32c_covers_the_whole_header() -> None:
    """
    Changing any byte after the signature is caught by the checksum or by
    an earlier check; a larger declared length only makes the header look
    incomplete.  The one blind spot is inherent to the spec: a changed type
    byte of the CRC32C TLV turns it into some other TLV.
    """
    header = with_crc32c(0x21, 0x21, ADDRESSES6 + tlv(0x05, b"connection-1"))
    crc_type_position = len(header) - 7
    assert parse(header) is not None
    for position in set(range(len(V2_SIGNATURE), len(header))) - {crc_type_position}:
        tampered = bytearray(header + PAYLOAD)
        tampered[position] ^= 0x40
        try:
            result = parse(bytes(tampered))
        except InvalidProxyHeader:
            continue
        assert (position, result) == (len(V2_SIGNATURE) + 3, None)


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("signature", [V1_SIGNATURE, V2_SIGNATURE], ids=["v1", "v2"])
def test_detect_signature_prefixes(signature: bytes) -> None:
    assert [detect(signature[:size]) for size in range(len(signature))] == [Detection.UNDECIDED] * len(signature)
    assert detect(signature) is Detection.HEADER
    assert detect(signature + PAYLOAD) is Detection.HEADER


@pytest.mark.parametrize(
    "prefix",
    [b"G", b"\x16", b"\x00", b"PROXZ", b"PROXY\r\n", b"PROXY\t", b"\r\n\r\n\x00\r\nQUIX", b"\r\r", b"\r\n\r\n\n"],
)
def test_detect_no_header(prefix: bytes) -> None:
    assert detect(prefix) is Detection.NO_HEADER


def test_detect_decides_after_one_byte() -> None:
    """
    Only the first bytes of the two signatures leave the question open.
    """
    undecided = [byte for byte in range(256) if detect(bytes([byte])) is Detection.UNDECIDED]
    assert undecided == [ord("\r"), ord("P")]


def test_signatures() -> None:
    assert V2_SIGNATURE == bytes.fromhex("0D0A0D0A000D0A515549540A")
    assert len(LONGEST_V1) == MAX_V1_LENGTH


# ---------------------------------------------------------------- ProxyInfo


def test_info_properties() -> None:
    info4 = proxy(2, ("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=((0x04, b""), (0x05, b"first"), (0x05, b"second")))
    assert (info4.family, info4.unique_id) == (4, b"first")
    info6 = proxy(1, ("::1", 1), ("::2", 2))
    assert (info6.family, info6.unique_id) == (6, None)
    assert (V2_LOCAL_INFO.family, V1_UNKNOWN_INFO.family) == (None, None)
    assert (info6.alpn, info6.authority, info6.ssl, info6.vendor) == (None, None, None, {})


def decoded(tlvs: bytes) -> ProxyInfo:
    info, _ = parse(tcp4(tlvs))
    return info


TLS13 = SSLInfo(client_ssl=True, version="TLSv1.3")
CERTIFICATE = dataclasses.replace(TLS13, client_cert_conn=True, client_cert_sess=True)
VERIFIED = dataclasses.replace(CERTIFICATE, verified=True)


@pytest.mark.parametrize(
    "header, authority, alpn, ssl",
    [
        pytest.param(
            HAPROXY_SSL_CN, None, None, dataclasses.replace(VERIFIED, cn="Example Common Name Client Cert"), id="cn"
        ),
        pytest.param(
            HAPROXY_SSL_CIPHER, None, None, dataclasses.replace(TLS13, cipher="TLS_AES_256_GCM_SHA384"), id="cipher"
        ),
        pytest.param(
            tcp4(tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, bytes(5)) + SSL_TLV),
            "example.com",
            "h2",
            dataclasses.replace(VERIFIED, cn="client"),
            id="all-three",
        ),
    ],
)
def test_tls_properties(header: bytes, authority: str | None, alpn: str | None, ssl: SSLInfo) -> None:
    info, _ = parse(header)
    assert (info.authority, info.alpn, info.ssl, info.vendor) == (authority, alpn, ssl, {})


@pytest.mark.parametrize(
    "tlvs, expected",
    [
        # Without a certificate verify means nothing: HAProxy sends 0, the
        # spec's wording non-zero, go-proxyproto's tests 1 without TLS.
        pytest.param(ssl_tlv(1, VERSION), TLS13, id="no-certificate-verify-0"),
        pytest.param(ssl_tlv(1, VERSION, verify=18), TLS13, id="no-certificate-verify-18"),
        pytest.param(ssl_tlv(0, verify=1), SSLInfo(client_ssl=False), id="not-tls"),
        pytest.param(ssl_tlv(7, VERSION, verify=18), CERTIFICATE, id="not-verified"),
        pytest.param(ssl_tlv(7, VERSION), VERIFIED, id="verified"),
        pytest.param(
            ssl_tlv(3, VERSION), dataclasses.replace(VERIFIED, client_cert_sess=False), id="connection-only"
        ),
        pytest.param(ssl_tlv(5, VERSION), dataclasses.replace(VERIFIED, client_cert_conn=False), id="session-only"),
        # Later revisions of the spec add sub-TLVs (0x26 group, 0x28 the
        # client certificate): ignored, as are client bits it does not define.
        pytest.param(
            ssl_tlv(0xF9, tlv(0x26, b"X25519"), VERSION, tlv(0x28, b"\x30\x03\x01")), TLS13, id="unknown-sub-tlvs-bits"
        ),
        pytest.param(ssl_tlv(1, VERSION, tlv(0x21, b"TLSv1.2")), TLS13, id="first-version"),
        pytest.param(SSL_TLV + ssl_tlv(0), dataclasses.replace(VERIFIED, cn="client"), id="first-ssl-tlv"),
        pytest.param(
            ssl_tlv(7, VERSION, tlv(0x22, "J\u00fcrgen \u00c7elik".encode())),
            dataclasses.replace(VERIFIED, cn="J\u00fcrgen \u00c7elik"),
            id="cn-utf8",
        ),
    ],
)
def test_ssl_tlv(tlvs: bytes, expected: SSLInfo) -> None:
    assert decoded(tlvs).ssl == expected


def test_authority_and_alpn_are_utf8_and_first_wins() -> None:
    info = decoded(tlv(0x02, "b\u00fccher.example".encode()) + tlv(0x02, b"x") + tlv(0x01, b"\x00") + tlv(0x01, b"h2"))
    assert (info.authority, info.alpn) == ("b\u00fccher.example", "\x00")


@pytest.mark.parametrize(
    "tlvs, vendor",
    [
        # The captures' TLVs (without AWS's CRC32C, which covers its own header).
        pytest.param(AWS_VPCE[35:], {"aws_vpce_id": "vpce-08d2bf15fac5001c9"}, id="aws-capture"),
        pytest.param(GCP_PSC[28:], {"gcp_psc_id": "43686719580552292"}, id="gcp-capture"),
        # go-proxyproto's test vectors (tlvparse/azure_test.go, gcp_test.go).
        pytest.param(tlv(0xEE, bytes.fromhex("01c1450021")), {"azure_linkid": "553665985"}, id="azure"),
        pytest.param(tlv(0xE0, bytes.fromhex("ffffffffc0a86402")), {"gcp_psc_id": "18446744072646845442"}, id="gcp"),
        pytest.param(
            tlv(0xEA, b"\x01vpce-abc123") + tlv(0xEE, bytes.fromhex("01c1450021")) + tlv(0xE0, bytes(8)),
            {"aws_vpce_id": "vpce-abc123", "azure_linkid": "553665985", "gcp_psc_id": "0"},
            id="all-three",
        ),
        # The first TLV in the vendor's layout counts (go: "Multiple TLVs").
        pytest.param(
            tlv(0xEE, b"\x02\x01\x01\x01\x01")
            + tlv(0xEE, b"\x02\x01\x01")
            + tlv(0xEE, bytes.fromhex("01c1450021"))
            + tlv(0xEE, bytes.fromhex("01c1450022")),
            {"azure_linkid": "553665985"},
            id="azure-first-well-formed",
        ),
        # Another layout is someone else's use of the shared range: left
        # out, and the header stands.
        pytest.param(tlv(0xEA, b"\x02vpce-abc123"), {}, id="aws-other-subtype"),
        pytest.param(tlv(0xEA, b"\x01vcpe-!?***&&&&&&&"), {}, id="aws-bad-characters"),
        pytest.param(tlv(0xEA, b"\x01"), {}, id="aws-empty-id"),
        pytest.param(tlv(0xEA, b""), {}, id="aws-empty"),
        pytest.param(tlv(0xEE, bytes.fromhex("02c1450021")), {}, id="azure-other-subtype"),
        pytest.param(tlv(0xEE, bytes.fromhex("01c14500")), {}, id="azure-4-bytes"),
        pytest.param(tlv(0xEE, bytes.fromhex("01c145002100")), {}, id="azure-6-bytes"),
        pytest.param(tlv(0xE0, bytes(7)), {}, id="gcp-7-bytes"),
        pytest.param(tlv(0xE0, bytes(9)), {}, id="gcp-9-bytes"),
        pytest.param(tlv(0xE1, b"\x01alibaba") + tlv(0xEF, b"") + tlv(0xFF, bytes(8)), {}, id="other-types"),
    ],
)
def test_vendor_tlvs(tlvs: bytes, vendor: dict[str, str]) -> None:
    assert decoded(tlvs).vendor == vendor


def test_info_is_frozen_with_slots() -> None:
    info = proxy(1, ("1.2.3.4", 1), ("5.6.7.8", 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.command = "LOCAL"  # type: ignore[misc]
    assert not hasattr(info, "__dict__")
    assert hash(info) == hash(proxy(1, ("1.2.3.4", 1), ("5.6.7.8", 2)))
