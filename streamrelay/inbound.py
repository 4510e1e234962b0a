"""
Inbound PROXY headers: a wrapping factory that reads, checks or rules out a
header before the route's own protocol sees the connection.

Unlike C{twisted.protocols.haproxy}, the wrapped protocol is only built once
the header question is settled, so its C{connectionMade} already sees the
real client in C{getPeer()}; headers are only believed from trusted peers,
must arrive within a deadline, and a peer that sends nothing is not stalled
forever where a header is optional.  Once settled the wrapper steps out of
the data path (the transport delivers straight to the wrapped protocol,
half-close included) and stays only as that protocol's transport, answering
C{getPeer}/C{getHost} with the addresses from the header.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocolFactory,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from .addresses import describe
from .compat import swap_protocol
from .config import ProxyProtocolConfig
from .events import RefusalLog
from .proxyproto.exceptions import InvalidProxyHeader
from .proxyproto.info import ProxyInfo
from .proxyproto.parser import Detection, detect, parse
from .stats import RouteStats

__all__ = ["Expect", "ProxyHeaderFactory", "ProxyHeaderProtocol", "expectation", "received_header"]


class Expect(Enum):
    """What a peer may send first, given the mode and whether it is trusted."""

    HEADER = "header"  # it must send a valid header
    MAYBE = "maybe"  # a header is parsed if present
    NO_HEADER = "no header"  # a header would be a spoofing attempt
    NOTHING = "nothing"  # it may not connect at all


def expectation(config: ProxyProtocolConfig, peer_host: str) -> Expect:
    """GoDoxy's C{required} and C{mixed}, GOST's C{optional}."""
    trusted = config.trusts(peer_host)
    if config.mode == "required":
        return Expect.HEADER if trusted else Expect.NOTHING
    if config.mode == "mixed":
        return Expect.HEADER if trusted else Expect.NO_HEADER
    return Expect.MAYBE if trusted else Expect.NO_HEADER


def _address(endpoint: tuple[str, int]) -> IPv4Address | IPv6Address:
    host, port = endpoint
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(ProtocolWrapper):
    """Settles the header question for one connection, then steps aside."""

    factory: ProxyHeaderFactory
    transport: ITCPTransport

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]  # no WrappingFactory; inner built later
        self.received = b""
        self.expect = Expect.HEADER
        self.info: ProxyInfo | None = None
        self.timer: IDelayedCall | None = None
        self.peer = ""

    def logPrefix(self) -> str:
        return "ProxyHeader"

    def makeConnection(self, transport: ITCPTransport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        config = self.factory.config
        peer = self.transport.getPeer()
        self.peer = describe(peer)
        self.expect = expectation(config, peer.host)
        if self.expect is Expect.NOTHING:
            self.reject("untrusted", "untrusted peer: mode required accepts only trusted_proxies")
            return
        self.factory.pending.add(self)
        self.factory.changed()
        wait = config.timeout if self.expect is Expect.HEADER else config.detect_timeout
        self.timer = self.factory.reactor.callLater(wait, self.timed_out)

    # -- deciding

    def dataReceived(self, data: bytes) -> None:
        if self.expect is not Expect.HEADER:
            if not self.received and self.timer is not None:
                self.timer.reset(self.factory.config.timeout)  # a first byte: no longer silent
            self.received += data
            detection = detect(self.received)
            if detection is Detection.NO_HEADER:
                self.settle()
                return
            if detection is Detection.UNDECIDED:
                return
            if self.expect is Expect.NO_HEADER:
                self.reject("untrusted", "PROXY header from an untrusted peer (spoofing attempt)")
                return
            self.expect = Expect.HEADER
        else:
            self.received += data
        try:
            parsed = parse(self.received)
        except InvalidProxyHeader as e:
            self.reject("invalid", f"invalid PROXY header: {e}")
            return
        if parsed is not None:
            self.settle(*parsed)

    def timed_out(self) -> None:
        self.timer = None
        if self.expect is Expect.HEADER:
            self.reject("timeout", "PROXY header timeout")
        else:
            self.settle()  # silence, or bytes that never became a header

    def readConnectionLost(self) -> None:
        if self.expect is Expect.HEADER:
            self.reject("incomplete", "closed before the PROXY header was complete")
        else:
            self.settle(eof=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Only reached before the header question is settled."""
        self.stop_waiting()

    def stop_waiting(self) -> None:
        if self in self.factory.pending:
            self.factory.pending.discard(self)
            self.factory.changed()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def reject(self, kind: str, reason: str) -> None:
        """
        Reset the connection; the route's refusal log counts every rejection
        but logs about one a second, so a flood of bad peers is no log flood.
        C{kind} is what the route's statistics count it as.
        """
        self.stop_waiting()
        self.factory.stats.header_errors[kind] += 1
        self.factory.refusals.refuse("rejected", client=self.peer, reason=reason)
        self.transport.abortConnection()

    def settle(self, info: ProxyInfo | None = None, length: int = 0, eof: bool = False) -> None:
        """Hand the connection, minus the header, to the wrapped protocol."""
        self.stop_waiting()
        if info is not None and info.source is not None:
            self.info = info
        payload, self.received = self.received[length:], b""
        inner = self.factory.wrapped.buildProtocol(self.getPeer())
        if inner is None:  # the factory turned the connection down
            self.transport.abortConnection()
            return
        self.wrappedProtocol = inner
        swap_protocol(self.transport, inner)  # out of the data path from now on
        inner.makeConnection(self)  # type: ignore[arg-type]  # provides the transport's interfaces
        if payload:
            inner.dataReceived(payload)
        if eof:
            IHalfCloseableProtocol(inner).readConnectionLost()

    # -- the transport the wrapped protocol sees

    def getPeer(self) -> IPv4Address | IPv6Address:
        if self.info is not None and self.info.source is not None:
            return _address(self.info.source)
        return self.transport.getPeer()

    def getHost(self) -> IPv4Address | IPv6Address:
        if self.info is not None and self.info.destination is not None:
            return _address(self.info.destination)
        return self.transport.getHost()


class ProxyHeaderFactory(ServerFactory):
    """Wraps a route's server factory with the inbound PROXY header policy."""

    noisy = False

    def __init__(
        self,
        wrapped: IProtocolFactory,
        config: ProxyProtocolConfig,
        refusals: RefusalLog,
        reactor: IReactorTime,
        stats: RouteStats | None = None,
    ) -> None:
        self.wrapped = wrapped
        self.config = config
        self.refusals = refusals
        self.stats = stats or RouteStats()
        self.reactor = reactor
        self.pending: set[ProxyHeaderProtocol] = set()
        #: Called whenever C{pending} changes (connection limits).
        self.changed: Callable[[], None] = lambda: None

    # Twisted's _ProtoWithFactory wants a factory attribute any Factory can be
    # assigned to; ours is narrowed to this class.
    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:  # type: ignore[override]
        return ProxyHeaderProtocol(self)

    def close_pending(self) -> None:
        """Drop connections still waiting for their header (shutdown)."""
        for protocol in list(self.pending):
            protocol.stop_waiting()
            protocol.transport.abortConnection()


def received_header(transport: object) -> ProxyInfo | None:
    """
    The inbound PROXY header a connection came with, if any: found below the
    layers a pair's transport may be wrapped in (a ClientHello peek, TLS).
    """
    while transport is not None:
        if isinstance(transport, ProxyHeaderProtocol):
            return transport.info
        transport = getattr(transport, "transport", None)
    return None
