"""
A route's running totals, for metrics and the status page.

Plain integers bumped where a connection or session begins and ends, never
per byte or per datagram: byte and datagram counts are added up when a pair
or session finishes, and whoever reads the totals adds the live ones (which
keep their own counts anyway).  One L{RouteStats} lives as long as its
route, across reloads.  Refusals are counted per kind by the route's
L{streamrelay.events.RefusalLog}.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.error import (
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.python.failure import Failure

__all__ = ["RouteStats", "dial_failure_kind"]


class RouteStats:
    """What one route has done since it started."""

    __slots__ = (
        "accepted", "closed", "dial_failures", "bytes_up", "bytes_down", "spliced",
        "header_errors", "sessions_opened", "sessions_closed", "datagrams_up", "datagrams_down",
        "datagrams_dropped", "datagrams_oversized",
    )

    def __init__(self) -> None:
        #: TCP connections accepted (after any PROXY header).
        self.accepted = 0
        #: Finished TCP pairs by their C{closed} reason.
        self.closed: Counter[str] = Counter()
        #: Dials given up, by L{dial_failure_kind}.
        self.dial_failures: Counter[str] = Counter()
        #: Bytes of finished pairs and sessions: read from the client, from the target.
        self.bytes_up = 0
        self.bytes_down = 0
        #: Pairs that went on the splice path.
        self.spliced = 0
        #: Inbound PROXY headers refused, by reason (C{invalid}, C{timeout}, C{untrusted}, C{incomplete};
        #: UDP datagrams: L{streamrelay.datagrams.read_header}'s reasons).
        self.header_errors: Counter[str] = Counter()
        #: UDP sessions opened, and closed by reason (C{idle} is an expiry).
        self.sessions_opened = 0
        self.sessions_closed: Counter[str] = Counter()
        #: Datagrams of finished sessions each way, and those not sent.
        self.datagrams_up = 0
        self.datagrams_down = 0
        self.datagrams_dropped = 0
        #: Of those, datagrams too large to send with the outbound PROXY header (counted as dropped).
        self.datagrams_oversized = 0


def dial_failure_kind(reason: Failure) -> str:
    """A dial failure's kind, for counting: refused, timeout, unreachable, resolve or error (C{tls}: L{streamrelay.tcp})."""
    if reason.check(ConnectionRefusedError):
        return "refused"
    if reason.check(TimeoutError, TCPTimedOutError):
        return "timeout"
    if reason.check(NoRouteError):
        return "unreachable"
    if reason.check(DNSLookupError):
        return "resolve"
    return "error"
