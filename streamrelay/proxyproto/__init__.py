"""
The PROXY protocol (versions 1 and 2), which carries a client's original
address across layer-4 proxies: a strict incremental L{parse} for headers
received from untrusted peers, and builders for headers sent upstream.
"""

from .builder import build_v1, build_v2, unify_families
from .exceptions import InvalidProxyHeader
from .info import PP2_TYPE_CRC32C, PP2_TYPE_NOOP, PP2_TYPE_UNIQUE_ID, ProxyInfo
from .parser import MAX_V1_LENGTH, MAX_V2_LENGTH, V1_SIGNATURE, V2_SIGNATURE, Detection, detect, parse

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "Detection",
    "InvalidProxyHeader",
    "ProxyInfo",
    "build_v1",
    "build_v2",
    "detect",
    "parse",
    "unify_families",
]
