"""
Tests for L{streamrelay.proxyproto.builder}: exact bytes for known headers,
arguments refused with L{ValueError}, L{unify_families} and L{tls_tlvs}.
"""

from __future__ import annotations

import dataclasses

import crc32c
import pytest

from streamrelay.proxyproto import (
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyInfo,
    SSLInfo,
    build_v1,
    build_v2,
    parse,
    tls_tlvs,
    unify_families,
)

# ------------------------------------------------------------------------ v1


@pytest.mark.parametrize(
    "source, destination, expected",
    [
        pytest.param(
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            id="tcp4",
        ),
        pytest.param(("2001:DB8:0::1", 0), ("::1", 65535), b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n", id="tcp6"),
        pytest.param(
            ("::FFFF:102:304", 1), ("::1", 2), b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", id="tcp6-ipv4-mapped"
        ),
        pytest.param(None, None, b"PROXY UNKNOWN\r\n", id="unknown"),
    ],
)
def test_build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None, expected: bytes) -> None:
    assert build_v1(source, destination) == expected
    assert parse(expected) is not None


# ------------------------------------------------------------------------ v2

TCP4 = V2_SIGNATURE + bytes.fromhex("21 11 000c  7f000001 0a000001  dc04 01bb")
TCP6 = V2_SIGNATURE + bytes.fromhex(
    "21 21 0024  20010db8000000000000000000000001 00000000000000000000000000000001  0001 0002"
)
UDP4 = V2_SIGNATURE + bytes.fromhex("21 12 000c  01020304 05060708  0001 0002")
LOCAL = V2_SIGNATURE + bytes.fromhex("20 00 0000")
PROXY_UNSPEC = V2_SIGNATURE + bytes.fromhex("21 00 0000")


@pytest.mark.parametrize(
    "source, destination, options, expected",
    [
        pytest.param(("127.0.0.1", 56324), ("10.0.0.1", 443), {}, TCP4, id="tcp4"),
        pytest.param(("2001:db8::1", 1), ("::1", 2), {}, TCP6, id="tcp6"),
        pytest.param(("1.2.3.4", 1), ("5.6.7.8", 2), {"transport": "UDP"}, UDP4, id="udp4"),
        pytest.param(None, None, {"command": "LOCAL"}, LOCAL, id="local"),
        pytest.param(("1.2.3.4", 1), ("5.6.7.8", 2), {"command": "LOCAL"}, LOCAL, id="local-drops-addresses"),
        pytest.param(None, None, {}, PROXY_UNSPEC, id="proxy-without-addresses"),
        pytest.param(
            ("127.0.0.1", 56324),
            ("10.0.0.1", 443),
            {"tlvs": [(0x02, b"example.com"), (0x04, b""), (0x05, b"id")]},
            TCP4[:14]
            + bytes.fromhex("0022")
            + TCP4[16:]
            + bytes.fromhex("02000b")
            + b"example.com"
            + bytes.fromhex("040000 050002")
            + b"id",
            id="tlvs-in-order",
        ),
    ],
)
def test_build_v2(
    source: tuple[str, int] | None, destination: tuple[str, int] | None, options: dict, expected: bytes
) -> None:
    assert build_v2(source, destination, **options) == expected


@pytest.mark.parametrize("command", ["PROXY", "LOCAL"])
def test_build_v2_crc32c(command: str) -> None:
    header = build_v2(("127.0.0.1", 56324), ("10.0.0.1", 443), command=command, tlvs=[(0x05, b"id")], crc32c=True)
    crc_tlv = header[-7:]
    assert crc_tlv[:3] == bytes.fromhex("030004")
    # Section 2.2.3: the checksum of the header with the field zeroed.
    assert int.from_bytes(crc_tlv[3:], "big") == crc32c.crc32c(header[:-4] + bytes(4))
    info, consumed = parse(header)
    assert consumed == len(header)
    assert info.tlvs == ((0x05, b"id"), (0x03, crc_tlv[3:]))


def test_build_v2_longest() -> None:
    filler = MAX_V2_LENGTH - len(TCP4) - 3
    header = build_v2(("127.0.0.1", 56324), ("10.0.0.1", 443), tlvs=[(0x04, bytes(filler))])
    assert len(header) == MAX_V2_LENGTH
    assert parse(header) is not None
    with pytest.raises(ValueError, match="exceeds 4096"):
        build_v2(("127.0.0.1", 56324), ("10.0.0.1", 443), tlvs=[(0x04, bytes(filler + 1))])
    with pytest.raises(ValueError, match="exceeds 4096"):
        build_v2(("127.0.0.1", 56324), ("10.0.0.1", 443), tlvs=[(0x04, bytes(filler - 6))], crc32c=True)


# --------------------------------------------------------------- bad arguments

V4 = ("1.2.3.4", 1)
V6 = ("::1", 2)


@pytest.mark.parametrize("build", [build_v1, build_v2])
@pytest.mark.parametrize(
    "source, destination, reason",
    [
        pytest.param(V4, None, "both source and destination", id="destination-missing"),
        pytest.param(None, V6, "both source and destination", id="source-missing"),
        pytest.param(V4, V6, "same IP version", id="mixed-families"),
        pytest.param(("::ffff:1.2.3.4", 1), V4, "same IP version", id="mapped-and-ipv4"),
        pytest.param(("localhost", 1), V4, "does not appear to be", id="hostname"),
        pytest.param(("fe80::1%eth0", 1), V6, "zone id", id="zone-id"),
        pytest.param((b"1.2.3.4", 1), V4, "must be a string", id="bytes-host"),
        pytest.param(("1.2.3.4", -1), V4, "invalid port", id="negative-port"),
        pytest.param(("1.2.3.4", 65536), V4, "invalid port", id="port-too-large"),
        pytest.param(("1.2.3.4", "80"), V4, "invalid port", id="string-port"),
        pytest.param(("1.2.3.4", True), V4, "invalid port", id="bool-port"),
    ],
)
def test_bad_addresses(build, source, destination, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        build(source, destination)


@pytest.mark.parametrize(
    "options, reason",
    [
        pytest.param({"command": "UNKNOWN"}, "command must be PROXY or LOCAL", id="command-unknown"),
        pytest.param({"command": "proxy"}, "command must be PROXY or LOCAL", id="command-lowercase"),
        pytest.param({"transport": "UNSPEC"}, "transport must be TCP or UDP", id="transport-unspec"),
        pytest.param({"transport": "SCTP"}, "transport must be TCP or UDP", id="transport-sctp"),
        pytest.param({"tlvs": [(256, b"")]}, "not a byte", id="tlv-type-256"),
        pytest.param({"tlvs": [(-1, b"")]}, "not a byte", id="tlv-type-negative"),
        pytest.param({"tlvs": [(0x03, bytes(4))]}, "crc32c=True", id="raw-crc32c"),
        pytest.param({"tlvs": [(0x05, bytes(129))]}, "UNIQUE_ID", id="unique-id-129"),
        pytest.param({"tlvs": [(0x04, bytes(0x10000))]}, "16 bits", id="tlv-value-64k"),
    ],
)
def test_bad_v2_options(options: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        build_v2(V4, ("5.6.7.8", 2), **options)


# ------------------------------------------------------------ unify_families


@pytest.mark.parametrize(
    "source, destination, expected_source, expected_destination",
    [
        pytest.param("1.2.3.4", "5.6.7.8", "1.2.3.4", "5.6.7.8", id="ipv4"),
        pytest.param("2001:db8::1", "::1", "2001:db8::1", "::1", id="ipv6"),
        pytest.param("::ffff:1.2.3.4", "5.6.7.8", "1.2.3.4", "5.6.7.8", id="mapped-source"),
        pytest.param("1.2.3.4", "::ffff:5.6.7.8", "1.2.3.4", "5.6.7.8", id="mapped-destination"),
        pytest.param("::ffff:1.2.3.4", "::FFFF:506:708", "1.2.3.4", "5.6.7.8", id="both-mapped"),
        pytest.param("1.2.3.4", "2001:db8::1", "::ffff:1.2.3.4", "2001:db8::1", id="ipv4-to-ipv6"),
        pytest.param("2001:db8::1", "5.6.7.8", "2001:db8::1", "::ffff:5.6.7.8", id="ipv6-to-ipv4"),
        pytest.param("::ffff:1.2.3.4", "2001:db8::1", "::ffff:1.2.3.4", "2001:db8::1", id="mapped-and-ipv6"),
        pytest.param("2001:DB8:0::1", "::0:1", "2001:db8::1", "::1", id="canonicalised"),
    ],
)
def test_unify_families(source: str, destination: str, expected_source: str, expected_destination: str) -> None:
    unified = unify_families((source, 1), (destination, 2))
    assert unified == ((expected_source, 1), (expected_destination, 2))
    # The result is always something both builders accept.
    assert parse(build_v1(*unified)) is not None
    assert parse(build_v2(*unified)) is not None


def test_unify_families_dual_stack_client_is_sent_as_tcp4() -> None:
    """
    The case unify_families exists for: an IPv4 client accepted on a
    dual-stack IPv6 listener, relayed to an IPv4 backend.
    """
    source, destination = unify_families(("::ffff:198.51.100.7", 40000), ("192.0.2.1", 443))
    assert build_v1(source, destination) == b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 443\r\n"
    info, _ = parse(build_v2(source, destination))
    assert info == ProxyInfo(2, "PROXY", "TCP", ("198.51.100.7", 40000), ("192.0.2.1", 443))


def test_unify_families_passes_none_through() -> None:
    assert unify_families(None, None) == (None, None)
    assert unify_families(V4, None) == (V4, None)


def test_unify_families_refuses_hostnames() -> None:
    with pytest.raises(ValueError):
        unify_families(("localhost", 1), V4)


# ------------------------------------------------------------------ tls_tlvs

#: What HAProxy 2.6.12 sent (send-proxy-v2-ssl-cn, proxy-v2-options
#: authority,ssl-cipher,cert-sig,cert-key) for a TLS 1.3 client asking for
#: x.example and h2 with a certificate for client.example that verified,
#: HAProxy presenting an RSA 2048 certificate signed with SHA-256; the same
#: run as test_haproxy.py, kept here so the layout is pinned without haproxy.
HAPROXY_TLVS = bytes.fromhex(
    "0100026832"  # ALPN "h2"
    "020009782e6578616d706c65"  # AUTHORITY "x.example"
    "200050"  # SSL, 80 bytes:
    "07"  # PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
    "00000000"  # verify: the certificate verified
    "210007544c5376312e33"  # VERSION "TLSv1.3"
    "22000e636c69656e742e6578616d706c65"  # CN "client.example"
    "25000752534132303438"  # KEY_ALG "RSA2048"
    "24000a5253412d534841323536"  # SIG_ALG "RSA-SHA256"
    "230016544c535f4145535f3235365f47434d5f534841333834"  # CIPHER "TLS_AES_256_GCM_SHA384"
)
TRUSTED = SSLInfo(
    client_ssl=True, client_cert_conn=True, client_cert_sess=True, verified=True, version="TLSv1.3",
    cipher="TLS_AES_256_GCM_SHA384", sig_alg="RSA-SHA256", key_alg="RSA2048", cn="client.example",
)
#: The same facts without the client certificate.
ANONYMOUS = dataclasses.replace(TRUSTED, client_cert_conn=False, client_cert_sess=False, verified=False, cn=None)


def encoded(tlvs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([kind]) + len(value).to_bytes(2, "big") + value for kind, value in tlvs)


def over_tls(version: str, **fields: object) -> SSLInfo:
    return SSLInfo(client_ssl=True, version=version, **fields)


def test_tls_tlvs_as_haproxy_sends_them() -> None:
    assert encoded(tls_tlvs(authority="x.example", alpn="h2", ssl=TRUSTED)) == HAPROXY_TLVS


@pytest.mark.parametrize(
    "facts, expected",
    [
        pytest.param({}, [], id="nothing"),
        pytest.param({"alpn": "http/1.1"}, [(0x01, b"http/1.1")], id="alpn"),
        pytest.param(
            {"authority": "b\u00fccher.example"}, [(0x02, "b\u00fccher.example".encode())], id="authority-utf8"
        ),
        # Not over TLS: HAProxy's five zero bytes.
        pytest.param({"ssl": SSLInfo(client_ssl=False)}, [(0x20, bytes(5))], id="ssl-not-tls"),
        # No certificate: verify is zero (HAProxy leaves it so).
        pytest.param(
            {"ssl": over_tls("TLSv1.2")},
            [(0x20, bytes.fromhex("0100000000 210007") + b"TLSv1.2")],
            id="ssl-no-certificate",
        ),
        # A certificate that did not verify: non-zero, OpenSSL's X509_V_ERR_UNSPECIFIED.
        pytest.param(
            {"ssl": over_tls("TLSv1.3", client_cert_conn=True, client_cert_sess=True)},
            [(0x20, bytes.fromhex("0700000001 210007") + b"TLSv1.3")],
            id="ssl-not-verified",
        ),
        pytest.param(
            {"ssl": over_tls("TLSv1.3", client_cert_sess=True, verified=True)},
            [(0x20, bytes.fromhex("0500000000 210007") + b"TLSv1.3")],
            id="ssl-certificate-in-session-only",
        ),
    ],
)
def test_tls_tlvs(facts: dict, expected: list[tuple[int, bytes]]) -> None:
    assert tls_tlvs(**{"authority": None, "alpn": None, "ssl": None, **facts}) == expected


@pytest.mark.parametrize(
    "facts",
    [
        pytest.param({"authority": "x.example"}, id="authority"),
        pytest.param({"alpn": "h2"}, id="alpn"),
        pytest.param({"ssl": SSLInfo(client_ssl=False)}, id="not-tls"),
        pytest.param({"ssl": over_tls("TLSv1.3")}, id="version"),
        pytest.param({"ssl": over_tls("TLSv1.2", cipher="ECDHE-RSA-AES128-GCM-SHA256")}, id="cipher"),
        pytest.param({"ssl": over_tls("TLSv1.3", sig_alg="ecdsa-with-SHA256")}, id="sig-alg"),
        pytest.param({"ssl": over_tls("TLSv1.3", key_alg="EC256")}, id="key-alg"),
        pytest.param({"ssl": over_tls("TLSv1.3", client_cert_conn=True, cn="\u00e9")}, id="cn-conn-unverified"),
        pytest.param({"ssl": over_tls("TLSv1.3", client_cert_sess=True, verified=True)}, id="sess-verified"),
        pytest.param({"ssl": ANONYMOUS}, id="anonymous"),
        pytest.param({"authority": "x.example", "alpn": "h2", "ssl": TRUSTED}, id="everything"),
    ],
)
def test_tls_tlvs_round_trip(facts: dict) -> None:
    full = {"authority": None, "alpn": None, "ssl": None, **facts}
    header = build_v2(V4, ("5.6.7.8", 2), tlvs=tls_tlvs(**full), crc32c=True)
    info, _ = parse(header)
    assert {"authority": info.authority, "alpn": info.alpn, "ssl": info.ssl} == full


@pytest.mark.parametrize(
    "facts, reason",
    [
        pytest.param({"alpn": ""}, "ALPN TLV is empty", id="alpn-empty"),
        pytest.param({"alpn": "a" * 256}, "ALPN TLV is longer than 255 bytes", id="alpn-256"),
        pytest.param({"authority": ""}, "AUTHORITY TLV is empty", id="authority-empty"),
        pytest.param({"authority": "\u00fc" * 128}, "longer than 255 bytes", id="authority-256-bytes-in-utf8"),
        pytest.param({"authority": "\ud800.example"}, "AUTHORITY TLV is not utf-8", id="authority-surrogate"),
        pytest.param({"ssl": over_tls("TLSv1.3\u00e9")}, "SSL version is not ascii", id="version"),
        pytest.param({"ssl": over_tls("")}, "SSL version is empty", id="version-empty"),
        pytest.param({"ssl": over_tls("v", cipher="")}, "SSL cipher is empty", id="cipher-empty"),
        pytest.param({"ssl": over_tls("v", cn="\udc00")}, "SSL CN is not utf-8", id="cn-surrogate"),
        pytest.param({"ssl": over_tls("v", cn="a" * 0x10000)}, "longer than 65535", id="cn-64k"),
        pytest.param(
            {"ssl": over_tls("v", cipher="a" * 30000, sig_alg="a" * 30000, key_alg="a" * 30000)},
            "16 bits",
            id="ssl-tlv-over-64k",
        ),
    ],
)
def test_tls_tlvs_refused(facts: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        tls_tlvs(**{"authority": None, "alpn": None, "ssl": None, **facts})


def test_tls_tlvs_fit_the_header_or_are_refused() -> None:
    """
    Each value fits its TLV, but the header as a whole is held to
    L{MAX_V2_LENGTH} by build_v2, as every header is.
    """
    tlvs = tls_tlvs(authority=None, alpn=None, ssl=over_tls("v", cn="a" * 4100))
    with pytest.raises(ValueError, match="exceeds 4096"):
        build_v2(V4, ("5.6.7.8", 2), tlvs=tlvs)


@pytest.mark.parametrize(
    "fields, reason",
    [
        pytest.param({"client_ssl": False, "client_cert_conn": True}, "without PP2_CLIENT_SSL", id="cert-without-tls"),
        pytest.param({"client_ssl": False, "version": "TLSv1.3"}, "without PP2_CLIENT_SSL", id="version-without-tls"),
        pytest.param({"client_ssl": False, "cn": "x"}, "without PP2_CLIENT_SSL", id="cn-without-tls"),
        pytest.param({"client_ssl": True}, "without a TLS version", id="tls-without-version"),
        pytest.param(
            {"client_ssl": True, "version": "TLSv1.3", "verified": True}, "without a client certificate", id="verified"
        ),
    ],
)
def test_ssl_info_refuses_what_has_no_meaning(fields: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        SSLInfo(**fields)
