"""
The one exception the PROXY protocol parser raises.
"""

from __future__ import annotations

__all__ = ["InvalidProxyHeader"]


class InvalidProxyHeader(ValueError):
    """
    The bytes at the start of a connection are not a valid PROXY protocol
    header and never will be, however many more bytes arrive.

    C{str()} is a short reason such as C{"v1: port has a leading zero"}, safe
    to log: it never echoes bytes received from the peer.
    """
