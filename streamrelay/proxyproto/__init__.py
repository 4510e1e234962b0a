"""
The PROXY protocol (versions 1 and 2), which carries a client's original
address across layer-4 proxies: a strict incremental L{parse} for headers
received from untrusted peers, and builders for headers sent upstream,
TLS facts (L{tls_tlvs}, L{SSLInfo}) included.
"""

from .builder import build_v1, build_v2, tls_tlvs, unify_families
from .exceptions import InvalidProxyHeader
from .info import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    ProxyInfo,
    SSLInfo,
)
from .parser import MAX_V1_LENGTH, MAX_V2_LENGTH, V1_SIGNATURE, V2_SIGNATURE, Detection, detect, parse

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "Detection",
    "InvalidProxyHeader",
    "ProxyInfo",
    "SSLInfo",
    "build_v1",
    "build_v2",
    "detect",
    "parse",
    "tls_tlvs",
    "unify_families",
]
