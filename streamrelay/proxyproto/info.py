"""
What a PROXY protocol header says about the connection it precedes: the
addresses, and the TLVs this package gives meaning to (TLS facts, cloud load
balancers' connection ids).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "Command",
    "ProxyInfo",
    "SSLInfo",
    "Transport",
    "canonical_host",
]

#: TLV types from section 2.2 of the spec that this package gives meaning to.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
#: Second-level types inside PP2_TYPE_SSL (section 2.2.6).
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
#: Bits of the SSL TLV's C{client} field (section 2.2.6).
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
#: Cloud load balancers' types, from the range section 2.2.8 leaves to
#: applications (0xE0-0xEF), so another sender may use them differently.
PP2_TYPE_GCP = 0xE0
PP2_TYPE_AWS = 0xEA
PP2_TYPE_AZURE = 0xEE

#: The SSL TLV's fixed part: the C{client} bits and the 32-bit C{verify}.
SSL_FIXED = struct.Struct("!BI")
#: What a sender puts in C{verify} for a client certificate that did not
#: verify when it knows no better reason: OpenSSL's
#: X509_V_ERR_UNSPECIFIED (HAProxy sends OpenSSL's actual verify result).
VERIFY_FAILED = 1
_TLV_HEAD = struct.Struct("!BH")

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
        The properties below decode the ones this package knows; where a
        type occurs more than once, the first counts.
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
        return self._first(PP2_TYPE_UNIQUE_ID)

    @property
    def alpn(self) -> str | None:
        """
        The application protocol the client negotiated over TLS
        (PP2_TYPE_ALPN), e.g. C{"h2"}.
        """
        value = self._first(PP2_TYPE_ALPN)
        return None if value is None else ALPN.decode(value)

    @property
    def authority(self) -> str | None:
        """
        The host name the client asked for (PP2_TYPE_AUTHORITY): its TLS SNI.
        """
        value = self._first(PP2_TYPE_AUTHORITY)
        return None if value is None else AUTHORITY.decode(value)

    @property
    def ssl(self) -> SSLInfo | None:
        """
        What the upstream proxy knew of the client's TLS (PP2_TYPE_SSL).
        """
        value = self._first(PP2_TYPE_SSL)
        return None if value is None else decode_ssl(value)

    @property
    def vendor(self) -> dict[str, str]:
        """
        The connection ids cloud load balancers add, for the logs:
        C{aws_vpce_id} (AWS PrivateLink endpoint, C{"vpce-..."}),
        C{azure_linkid} (Azure Private Link LINKID) and C{gcp_psc_id}
        (Google Private Service Connect connection id), the numbers in
        decimal.  A TLV of those types in another layout is someone else's
        use of the shared range and is left out.
        """
        found: dict[str, str] = {}
        for kind, value in self.tlvs:
            if kind in _VENDOR_TLVS:
                key, decode = _VENDOR_TLVS[kind]
                decoded = decode(value)
                if decoded is not None:
                    found.setdefault(key, decoded)
        return found

    def _first(self, kind: int) -> bytes | None:
        return next((value for each, value in self.tlvs if each == kind), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class SSLInfo:
    """
    The PP2_TYPE_SSL facts about a client's TLS (section 2.2.6 of the spec),
    given by keyword.  Only combinations the spec gives a meaning to can be
    built, so a header built from one parses back to an equal one.

    @ivar client_ssl: the client connected over TLS (PP2_CLIENT_SSL); all the
        other fields need it, and C{version} is then required.
    @ivar client_cert_conn: the client presented a certificate on this
        connection (PP2_CLIENT_CERT_CONN).
    @ivar client_cert_sess: the client presented one at least once over the
        TLS session this connection belongs to (PP2_CLIENT_CERT_SESS).
    @ivar verified: that certificate verified: C{verify} is zero.  Without a
        certificate, C{verify} is zero too (as HAProxy sends it) but means
        nothing, so C{verified} is then false.
    @ivar version: the TLS version, e.g. C{"TLSv1.3"} (US-ASCII).
    @ivar cipher: the cipher, e.g. C{"TLS_AES_256_GCM_SHA384"} (US-ASCII).
    @ivar sig_alg: the signature algorithm of the certificate the relay (the
        TLS server) presented, e.g. C{"RSA-SHA256"} (US-ASCII).
    @ivar key_alg: the key algorithm of that certificate, e.g. C{"RSA2048"}
        (US-ASCII).
    @ivar cn: the common name of the client certificate's subject (UTF-8).
    """

    client_ssl: bool
    client_cert_conn: bool = False
    client_cert_sess: bool = False
    verified: bool = False
    version: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    cn: str | None = None

    def __post_init__(self) -> None:
        certificate = self.client_cert_conn or self.client_cert_sess
        if not self.client_ssl:
            if certificate or self.verified or any(text is not None for text in self.strings().values()):
                raise ValueError("SSL TLV: TLS facts without PP2_CLIENT_SSL")
        elif self.version is None:
            raise ValueError("SSL TLV: PP2_CLIENT_SSL without a TLS version")
        if self.verified and not certificate:
            raise ValueError("SSL TLV: verified without a client certificate")

    def strings(self) -> dict[int, str | None]:
        """
        The sub-TLV values by subtype, in the order HAProxy sends them
        (C{make_proxy_line_v2} in its src/connection.c).
        """
        return {
            PP2_SUBTYPE_SSL_VERSION: self.version,
            PP2_SUBTYPE_SSL_CN: self.cn,
            PP2_SUBTYPE_SSL_KEY_ALG: self.key_alg,
            PP2_SUBTYPE_SSL_SIG_ALG: self.sig_alg,
            PP2_SUBTYPE_SSL_CIPHER: self.cipher,
        }


# -- TLV values -------------------------------------------------------------
#
# Decoders raise ValueError with a reason that never quotes the value; the
# parser turns it into InvalidProxyHeader.


@dataclass(frozen=True, slots=True)
class Text:
    """
    The rules for a string value: not empty, in its encoding, at most
    C{limit} bytes.
    """

    name: str
    encoding: str
    limit: int = 0xFFFF

    def decode(self, value: bytes) -> str:
        self._check(value)
        try:
            return value.decode(self.encoding)
        except UnicodeDecodeError:
            raise ValueError(f"{self.name} is not {self.encoding}") from None

    def encode(self, text: str) -> bytes:
        try:
            value = text.encode(self.encoding)
        except UnicodeEncodeError:
            raise ValueError(f"{self.name} is not {self.encoding}") from None
        self._check(value)
        return value

    def _check(self, value: bytes) -> None:
        if not value:
            raise ValueError(f"{self.name} is empty")
        if len(value) > self.limit:
            raise ValueError(f"{self.name} is longer than {self.limit} bytes")


#: A protocol name is 1 to 255 bytes (RFC 7301, section 3.1).
ALPN = Text("ALPN TLV", "utf-8", 255)
#: HAProxy refuses a longer authority (HA_PP2_AUTHORITY_MAX); so do we.
AUTHORITY = Text("AUTHORITY TLV", "utf-8", 255)
#: The SSL sub-TLVs: section 2.2.6 makes the CN UTF-8, the rest US-ASCII.
SSL_STRINGS = {
    PP2_SUBTYPE_SSL_VERSION: Text("SSL version", "ascii"),
    PP2_SUBTYPE_SSL_CN: Text("SSL CN", "utf-8"),
    PP2_SUBTYPE_SSL_CIPHER: Text("SSL cipher", "ascii"),
    PP2_SUBTYPE_SSL_SIG_ALG: Text("SSL signature algorithm", "ascii"),
    PP2_SUBTYPE_SSL_KEY_ALG: Text("SSL key algorithm", "ascii"),
}


def iter_tlvs(data: bytes, offset: int, container: str) -> Iterator[tuple[int, int, int]]:
    """
    Split C{data} from C{offset} on into TLVs that must fill it exactly,
    yielding each one's type and the bounds of its value.
    """
    while offset < len(data):
        if len(data) - offset < _TLV_HEAD.size:
            raise ValueError("truncated TLV")
        kind, length = _TLV_HEAD.unpack_from(data, offset)
        start, offset = offset + _TLV_HEAD.size, offset + _TLV_HEAD.size + length
        if offset > len(data):
            raise ValueError(f"TLV overruns {container}")
        yield kind, start, offset


def decode_ssl(value: bytes) -> SSLInfo:
    """
    Decode a PP2_TYPE_SSL value strictly: the fixed part, then sub-TLVs
    filling the rest, the known ones well formed.  Unknown sub-TLVs (later
    revisions of the spec added some) and C{client} bits are ignored.
    """
    if len(value) < SSL_FIXED.size:
        raise ValueError(f"SSL TLV shorter than {SSL_FIXED.size} bytes")
    client, verify = SSL_FIXED.unpack_from(value)
    strings: dict[int, str] = {}
    for kind, start, end in iter_tlvs(value, SSL_FIXED.size, "the SSL TLV"):
        if kind in SSL_STRINGS:
            strings.setdefault(kind, SSL_STRINGS[kind].decode(value[start:end]))
    conn, sess = bool(client & PP2_CLIENT_CERT_CONN), bool(client & PP2_CLIENT_CERT_SESS)
    return SSLInfo(
        client_ssl=bool(client & PP2_CLIENT_SSL),
        client_cert_conn=conn,
        client_cert_sess=sess,
        verified=(conn or sess) and verify == 0,
        version=strings.get(PP2_SUBTYPE_SSL_VERSION),
        cipher=strings.get(PP2_SUBTYPE_SSL_CIPHER),
        sig_alg=strings.get(PP2_SUBTYPE_SSL_SIG_ALG),
        key_alg=strings.get(PP2_SUBTYPE_SSL_KEY_ALG),
        cn=strings.get(PP2_SUBTYPE_SSL_CN),
    )


_VPCE_ID = re.compile(rb"[A-Za-z0-9-]+")


def _aws_vpce_id(value: bytes) -> str | None:
    """
    AWS (Network Load Balancer behind a PrivateLink endpoint service): a
    subtype byte, 0x01 (PP2_SUBTYPE_AWS_VPCE_ID), then the endpoint id in
    ASCII.  https://docs.aws.amazon.com/elasticloadbalancing/latest/network/
    edit-target-group-attributes.html#proxy-protocol ("VPC endpoint
    services"); go-proxyproto's tlvparse/aws.go checks the same characters.
    """
    if value[:1] != b"\x01" or _VPCE_ID.fullmatch(value, 1) is None:
        return None
    return value[1:].decode("ascii")


def _azure_linkid(value: bytes) -> str | None:
    """
    Azure (Private Link service): a subtype byte, 0x01
    (PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID), then the private endpoint's
    LINKID as a little-endian uint32.  https://learn.microsoft.com/azure/
    private-link/private-link-service-overview#getting-connection-information-using-tcp-proxy-v2
    """
    if len(value) != 5 or value[0] != 0x01:
        return None
    return str(int.from_bytes(value[1:], "little"))


def _gcp_psc_id(value: bytes) -> str | None:
    """
    Google Cloud (Private Service Connect): the 8-byte pscConnectionId in
    network order.  https://cloud.google.com/vpc/docs/about-vpc-hosted-services#proxy-protocol
    """
    if len(value) != 8:
        return None
    return str(int.from_bytes(value, "big"))


#: Vendor TLV type -> key in L{ProxyInfo.vendor}, and its decoder (L{None}
#: for a value in another layout).
_VENDOR_TLVS: dict[int, tuple[str, Callable[[bytes], str | None]]] = {
    PP2_TYPE_AWS: ("aws_vpce_id", _aws_vpce_id),
    PP2_TYPE_AZURE: ("azure_linkid", _azure_linkid),
    PP2_TYPE_GCP: ("gcp_psc_id", _gcp_psc_id),
}
