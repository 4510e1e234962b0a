"""
Lean TCP transports for plain pairs, underneath the same protocols.

A plain pair (no TLS on either side, no hook that sees each read) is
spliced: the L{streamrelay.splice} engine moves its bytes, so Twisted's
transports only tell it when each socket is ready, and charge for a general
machinery on every connection: two C{fcntl}s and an C{ioctl} per accepted
socket, a log prefix string, a second C{connect} to learn how a dial went,
registrations dropped and made again when the engine takes a socket over,
and a C{shutdown} before every C{close}.  These transports do what such a
pair needs and no more, behind the interfaces the pair's protocols already
use (C{ITCPTransport}, C{IConsumer}, C{IPushProducer}):

- L{LeanConnection}: a connected socket, served for its whole life by the
  process's L{streamrelay.hub.Hub} (one reactor event for every ready
  socket, rather than one each).  Once spliced it passes readiness on to
  the engine (its C{driver}) without touching the registration.
- L{LeanConnector}: one dial attempt, a non-blocking C{connect} on a raw
  socket whose outcome C{SO_ERROR} tells; what L{streamrelay.dial.Dial}
  gets from C{connect} instead of Twisted's connector.
- the accepting side is L{streamrelay.compat.LimitedPort}, which gives each
  connection its factory calls C{lean} a L{LeanConnection}.

Socket options are set once: an accepted socket inherits C{TCP_NODELAY} and
C{SO_KEEPALIVE} from its listening socket (Linux copies both), a dialed one
gets them when it is made.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
from typing import Protocol as Interface

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionLost,
    NotConnectingError,
    TimeoutError,
    UserError,
    getConnectError,
)
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IProducer,
    IPushProducer,
    IReadWriteDescriptor,
    ITCPTransport,
    IWriteDescriptor,
)
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from .hub import hub_for
from .interfaces import IRelayReactor

__all__ = ["LeanConnection", "LeanConnector", "connect", "peer_address", "set_relay_options"]

#: What one read takes at most, as Twisted's transports do.
READ_SIZE = 1 << 16
#: Bytes buffered for writing above which a registered producer is paused.
HIGH_WATER = 1 << 16
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_TCP_ESTABLISHED = 1  # Linux <netinet/tcp.h>; Python does not name TCP states

#: A write half still open, to be shut after the buffer (L{LeanConnection.loseWriteConnection}), ...
_HALF = 1
#: ... or the whole connection, to be closed after it (L{LeanConnection.loseConnection}).
_WHOLE = 2


class Driver(Interface):
    """What takes a spliced connection's readiness over (the splice engine's end)."""

    def doRead(self) -> None: ...

    def doWrite(self) -> None: ...

    def connectionLost(self, reason: Failure) -> None: ...


def set_relay_options(skt: socket.socket) -> None:
    """The options every relayed socket has: no Nagle delay, keepalive probes."""
    skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    skt.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _failure(error: BaseException) -> Failure:
    """A failure of C{error}: Twisted's constructor has no annotations."""
    return Failure(error)  # type: ignore[no-untyped-call]


def _connect_failure(number: int) -> Failure:
    """A failed connect's C{errno} as the C{ConnectError} Twisted's own connectors report."""
    return _failure(getConnectError((number, os.strerror(number))))  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=1024)
def _target_address(host: str, port: int) -> IPv4Address | IPv6Address:
    """A target's address object (immutable, and the same for each of its connections): made once."""
    return peer_address(host, port)


def _established(skt: socket.socket) -> bool:
    """Whether the socket's TCP state (C{tcpi_state}, the first byte of C{TCP_INFO}) is ESTABLISHED."""
    return skt.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED


def peer_address(host: str, port: int) -> IPv4Address | IPv6Address:
    """The address object of an IP literal (an IPv6 one has a colon), as Twisted's transports give."""
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


@implementer(ITCPTransport, IConsumer, IPushProducer, IReadWriteDescriptor)
class LeanConnection:
    """
    A connected TCP socket driven straight through the hub.  Reads go to
    C{protocol} (with half-close, for an C{IHalfCloseableProtocol}) until a
    C{driver} takes them; writes are sent at once, and what the socket does
    not take waits in a buffer that pauses a registered producer above
    L{HIGH_WATER}.
    """

    disconnecting = False

    def __init__(
        self, skt: socket.socket, protocol: IProtocol, peer: IPv4Address | IPv6Address, reactor: IRelayReactor,
    ) -> None:
        self.socket = skt
        self.fd = skt.fileno()
        self.protocol = protocol
        self.peer = peer
        self.reactor = reactor
        self.hub = hub_for(reactor)
        self.host: IPv4Address | IPv6Address | None = None
        #: Whether the hub polls the descriptor for reading, for writing (the truth, kept here only).
        self.reading = False
        self.writing = False
        #: Set on the socket already (inherited from the listening socket, or set at creation).
        self.nodelay = True
        self.keepalive = True
        self.buffer = b""
        self.producer: IPushProducer | None = None
        self.producer_paused = False
        self.closing = 0  # _HALF or _WHOLE once asked, done after the buffer is written
        self.read_closed = False
        self.write_closed = False
        self.aborting = False
        self.lost = False
        #: Takes the readiness over while the connection is spliced.
        self.driver: Driver | None = None

    @classmethod
    def accepted(
        cls, skt: socket.socket, protocol: IProtocol, peer: IPv4Address | IPv6Address, reactor: IRelayReactor,
    ) -> LeanConnection:
        """The transport of a socket a listening port accepted (its options inherited), reading."""
        skt.setblocking(False)
        connection = cls(skt, protocol, peer, reactor)
        connection.startReading()
        return connection

    # -- what the relay asks of a TCP transport

    def fileno(self) -> int:
        return self.fd

    def getHandle(self) -> socket.socket:
        return self.socket

    def logPrefix(self) -> str:
        return "LeanConnection"

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self.peer

    def getHost(self) -> IPv4Address | IPv6Address:
        if self.host is None:
            host, port = self.socket.getsockname()[:2]
            self.host = peer_address(host, port)
        return self.host

    def setTcpNoDelay(self, enabled: bool) -> None:
        if enabled != self.nodelay:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)
            self.nodelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.nodelay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        if enabled != self.keepalive:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, enabled)
            self.keepalive = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.keepalive

    # -- the hub's registrations, each made or dropped only when it changes

    def startReading(self) -> None:
        if not self.reading and not self.lost:
            self.reading = True
            self.hub.update(self, True, self.writing)

    def stopReading(self) -> None:
        if self.reading:
            self.reading = False
            self.hub.update(self, False, self.writing)

    def startWriting(self) -> None:
        if not self.writing and not self.lost:
            self.writing = True
            self.hub.update(self, self.reading, True)

    def stopWriting(self) -> None:
        if self.writing:
            self.writing = False
            self.hub.update(self, self.reading, False)

    # -- IPushProducer: the other side's transport pauses our reads

    def pauseProducing(self) -> None:
        self.stopReading()

    def resumeProducing(self) -> None:
        if not self.read_closed and not self.closing & _WHOLE:
            self.startReading()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- reading

    def doRead(self) -> None:
        if self.driver is not None:
            self.driver.doRead()
            return
        try:
            data = self.socket.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self.connectionLost(_failure(ConnectionLost(e.strerror)))
            return
        if data:
            self.protocol.dataReceived(data)
            return
        self.read_closed = True
        self.stopReading()
        if IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
        else:
            self.connectionLost(connectionDone)

    # -- writing

    def write(self, data: bytes) -> None:
        if self.lost or self.closing or not data:
            return
        if not self.buffer:
            try:
                sent = self.socket.send(data)
            except OSError:  # full (EAGAIN), or failed: doWrite sees the error again and closes
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.buffer += data
        self.startWriting()
        if self.producer is not None and not self.producer_paused and len(self.buffer) > HIGH_WATER:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:  # type: ignore[override]
        self.write(b"".join(data))

    def doWrite(self) -> None:
        if self.driver is not None:
            self.driver.doWrite()
            return
        if self.buffer:
            try:
                sent = self.socket.send(self.buffer)
            except BlockingIOError:
                return
            except OSError as e:
                self.connectionLost(_failure(ConnectionLost(e.strerror)))
                return
            self.buffer = self.buffer[sent:]
            if self.buffer:
                return
        self.stopWriting()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        if self.closing & _WHOLE:
            self.connectionLost(connectionDone)
        elif self.closing & _HALF and not self.write_closed:
            self.write_closed = True
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # a reset, if any, comes with the next read
            if IHalfCloseableProtocol.providedBy(self.protocol):
                self.protocol.writeConnectionLost()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if not streaming or not IPushProducer.providedBy(producer):
            raise ValueError("a lean connection takes streaming producers only")
        self.producer = producer
        self.producer_paused = len(self.buffer) > HIGH_WATER
        if self.producer_paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    # -- closing

    def loseWriteConnection(self) -> None:
        """Send a FIN once the buffer is written (at the next writable event)."""
        if not self.lost and not self.closing:
            self.closing = _HALF
            self.startWriting()

    def loseConnection(self) -> None:
        """Close once the buffer is written (at the next writable event)."""
        if not self.lost and not self.closing & _WHOLE:
            self.closing |= _WHOLE
            self.disconnecting = True
            self.stopReading()
            self.startWriting()

    def abortConnection(self) -> None:
        """Reset now, dropping the buffer; the protocol hears of it from the reactor, as with Twisted's."""
        if self.lost or self.aborting:
            return
        self.aborting = True
        self.buffer = b""
        self.stopReading()
        self.stopWriting()
        self.reactor.callLater(0, self.connectionLost, _failure(ConnectionAborted()))

    def connectionLost(self, reason: Failure) -> None:
        """
        The end, once: the socket is closed (with a reset when aborted) and
        the protocol told.  While spliced, the engine hears of it first (the
        hub gave up on the descriptor) and hands the connection back.
        """
        if self.lost:
            return
        driver = self.driver
        if driver is not None:
            self.driver = None
            driver.connectionLost(reason)  # the engine releases the socket, then calls us again
            return
        self.lost = True
        self.stopReading()
        self.stopWriting()
        if isinstance(reason.value, ConnectionAborted):
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.socket.close()
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(reason)


@implementer(IWriteDescriptor)
class LeanConnector:
    """
    One attempt to connect to C{host}:C{port} within C{timeout} seconds.  Its
    factory builds the protocol of a connected attempt, or hears of a failed
    one (C{clientConnectionFailed}), as from C{reactor.connectTCP}.

    A target on the same host is often connected by the time C{connect}
    returns (the kernel runs the handshake on loopback before the call
    ends, though it answers C{EINPROGRESS}): C{TCP_INFO} tells, and such an
    attempt is reported connected at the reactor's next turn, with no
    registration or writability event spent on the wait.
    """

    def __init__(
        self, reactor: IRelayReactor, host: str, port: int, factory: IProtocolFactory, timeout: float,
    ) -> None:
        self.reactor = reactor
        self.hub = hub_for(reactor)
        self.factory = factory
        self.destination = _target_address(host, port)
        family = socket.AF_INET6 if isinstance(self.destination, IPv6Address) else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.fd = self.socket.fileno()
        self.timer: IDelayedCall | None = None
        self.connecting = True
        set_relay_options(self.socket)
        error = self.socket.connect_ex((host, port))
        if error == 0 or (error == errno.EINPROGRESS and _established(self.socket)):
            self.timer = reactor.callLater(0, self.connected)  # as Twisted does: never within the caller's call
        elif error == errno.EINPROGRESS:
            self.hub.update(self, False, True)
            self.timer = reactor.callLater(timeout, self.timed_out)
        else:  # reported from the reactor, as Twisted does, never during the caller's own call
            reactor.callLater(0, self.failed, _connect_failure(error))

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "LeanConnector"

    def doRead(self) -> None:
        """Never asked: an attempt waits for writability only."""

    def doWrite(self) -> None:
        """Writable: connected, or refused (C{SO_ERROR} says which)."""
        error = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.failed(_connect_failure(error))
            return
        if not _established(self.socket):
            return  # an event for an earlier socket of the same number, served in the same batch
        self.cancel_timer()
        self.hub.update(self, False, False)
        self.connected()

    def connected(self) -> None:
        """Give the socket a transport, reading, and the factory's protocol."""
        self.timer = None
        self.connecting = False
        protocol = self.factory.buildProtocol(self.destination)
        if protocol is None:
            self.socket.close()
            return
        transport = LeanConnection(self.socket, protocol, self.destination, self.reactor)
        transport.startReading()
        protocol.makeConnection(transport)

    def connectionLost(self, reason: Failure) -> None:
        """
        The descriptor was given up on: the reactor is shutting down (the
        hub tells its sockets, as the reactor tells its own), and
        C{SO_ERROR} may say why the attempt failed first.
        """
        if self.connecting:
            error = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.failed(_connect_failure(error) if error else reason)

    def timed_out(self) -> None:
        self.timer = None
        self.failed(_failure(TimeoutError()))  # type: ignore[no-untyped-call]

    def failed(self, reason: Failure) -> None:
        if not self.connecting:
            return
        self.connecting = False
        self.cancel_timer()
        self.hub.update(self, False, False)
        self.socket.close()
        self.factory.clientConnectionFailed(self, reason)  # type: ignore[attr-defined]

    def cancel_timer(self) -> None:
        """Cancel the pending timer: whichever fires (timeout, connected) forgets itself first."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def stopConnecting(self) -> None:
        """Give the attempt up (the factory hears of it as failed); too late once connected."""
        if not self.connecting:
            raise NotConnectingError()
        self.failed(_failure(UserError()))  # type: ignore[no-untyped-call]

    def getDestination(self) -> IPv4Address | IPv6Address:
        return self.destination


def connect(reactor: IRelayReactor, host: str, port: int, factory: IProtocolFactory, timeout: float) -> LeanConnector:
    """What C{reactor.connectTCP} does, with a L{LeanConnector}."""
    return LeanConnector(reactor, host, port, factory, timeout)
