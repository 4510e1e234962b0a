"""
Every use of a Twisted internal, in one place.

Twisted's public API stops short of six things the relay needs: accepting
no more connections than a limit leaves room for (on a socket it binds or
adopts, with a backlog a reload can change), giving an accepted socket a
transport of the relay's own (L{streamrelay.lean}), handing a socket back to its
transport after the splice engine relayed it, reading one datagram per
readiness event on a connected UDP socket, and the sockets systemd passed.
Each is done here, against attributes Twisted does not promise to keep;
tests pin each one (C{tests/test_compat.py}; the systemd sockets and
adopting one in C{tests/test_activation.py}, the backlog in
C{tests/test_reload.py}), so a Twisted upgrade that changes them fails
loudly there instead of quietly somewhere on the relay path.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, cast

from twisted.internet import tcp, udp
from twisted.internet.endpoints import _SystemdParser
from twisted.internet.interfaces import Binding, IProtocol, IProtocolFactory, IReactorFDSet, IReactorTCP
from twisted.python import log
from twisted.python.failure import Failure

from . import hub
from .interfaces import IRelayReactor
from .lean import LeanConnection, peer_address, set_relay_options

__all__ = [
    "LimitedPort", "SessionPort", "adopt_limited", "connection_under", "hand_back", "inherited_sockets", "listen_limited",
    "swap_protocol",
]


class LimitedPort(tcp.Port):
    """
    A listening port that accepts no more connections than C{room()} allows.

    C{tcp.Port.doRead} accepts up to C{numberAccepts} connections in one go
    (a number it grows under load), so pausing the port once a limit is
    reached comes too late for the rest of that batch.  Capping
    C{numberAccepts} before each batch leaves the connections beyond the
    limit in the kernel's backlog, where they wait for a free place.
    """

    room: Callable[[], int]

    def startListening(self) -> None:
        """Listen, with the options the lean connections inherit."""
        super().startListening()
        set_relay_options(self.socket)

    def doRead(self) -> None:
        room = self.room()
        if room <= 0:
            self.stopReading()
            return
        if self.numberAccepts > room:
            self.numberAccepts = room
        if getattr(self.factory, "lean", False):
            self.accept_lean()
        else:
            super().doRead()

    def accept_lean(self) -> None:
        """
        What C{tcp.Port.doRead} does (a batch of C{numberAccepts}, grown
        under load; C{EMFILE} recovered with Twisted's reserved descriptor),
        each connection given a L{LeanConnection} as its transport, the
        factory told of the peer's address as it built it.
        """
        accepted = 0
        factory, reactor = self.factory, cast(IRelayReactor, self.reactor)  # the route's, which is one
        assert factory is not None
        try:
            with tcp._BuffersLogs(self._logger.namespace, self._logger.observer) as logger:
                for skt, addr in tcp._accept(logger, range(self.numberAccepts), self.socket, tcp._reservedFD):
                    accepted += 1
                    if len(addr) == 4:  # IPv6: the scope, by name
                        addr = (socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0], addr[1])
                    peer = peer_address(addr[0], addr[1])
                    protocol = factory.buildProtocol(peer)
                    if protocol is None:
                        skt.close()
                        continue
                    protocol.makeConnection(LeanConnection.accepted(skt, protocol, peer, reactor))
        except BaseException:
            log.deferr()
        self.numberAccepts = self.numberAccepts + 20 if accepted == self.numberAccepts else max(1, accepted)

    def set_backlog(self, backlog: int) -> None:
        """Resize the accept queue in place: Linux takes a second C{listen()}."""
        self.backlog = backlog
        self.socket.listen(backlog)


def listen_limited(reactor: IReactorTCP, port: int | Binding, factory: IProtocolFactory, room: Callable[[], int],
                   backlog: int, interface: str) -> LimitedPort:
    """What C{reactor.listenTCP} does, with a L{LimitedPort}."""
    # tcp.Port takes a makeBinding() too, as listenTCP does; its annotation says int.
    listening = LimitedPort(port, factory, backlog, interface, reactor)  # type: ignore[arg-type]
    listening.room = room
    listening.startListening()
    return listening


def adopt_limited(reactor: IReactorFDSet, fd: int, family: int, factory: IProtocolFactory,
                  room: Callable[[], int]) -> LimitedPort:
    """What C{reactor.adoptStreamPort} does, with a L{LimitedPort} (the port dups C{fd})."""
    listening = LimitedPort._fromListeningDescriptor(reactor, fd, family, factory)
    listening.room = room
    listening.startListening()
    return listening


def inherited_sockets() -> dict[str, int]:
    """
    The sockets systemd passed, by C{FileDescriptorName=}.  Twisted reads
    C{LISTEN_FDS} once, when C{twisted.internet.endpoints} is imported (for
    its C{systemd:} endpoint), and removes it from the environment, so a
    later C{ListenFDs.fromEnvironment()} would find nothing: this shares
    that one reading with the C{systemd:} endpoints.
    """
    return _SystemdParser._sddaemon.inheritedNamedDescriptors()


def hand_back(connection: tcp.Connection | LeanConnection, reason: Failure) -> None:
    """
    End a TCP connection whose socket the relay drove itself, as the reactor
    would: C{tcp.Connection.connectionLost} closes the socket and tells the
    protocol (or its half-close methods' owner) why.
    """
    connection.connectionLost(reason)


def connection_under(transport: object) -> tcp.Connection | LeanConnection:
    """
    The TCP connection under C{transport} and the layers a relay puts over
    it (an inbound PROXY header's wrapper, a ClientHello peek, TLS), each of
    which keeps the one below as its C{transport}.
    """
    while not isinstance(transport, (tcp.Connection, LeanConnection)):
        transport = getattr(transport, "transport")
    return transport


def swap_protocol(transport: Any, protocol: IProtocol) -> None:
    """
    Deliver C{transport}'s events to C{protocol} from now on: how a wrapper
    that has done its job (an inbound PROXY header read) steps out of the
    data path.  Twisted's TCP transports read C{protocol} on every event.
    """
    transport.protocol = protocol


class SessionPort(udp.Port):
    """
    A connected UDP socket that reads one datagram per readiness event,
    polled by the process's L{streamrelay.hub.Hub} rather than by
    the reactor itself.

    Twisted's C{udp.Port.doRead} reads until the socket is empty, so a
    socket that receives replies one at a time would pay a failed
    C{recvfrom} (and an exception) for nearly every one; epoll is
    level-triggered and reports the socket again while more are queued.
    The sender is the connected address (C{_connectedAddr}).
    """

    def doRead(self) -> None:
        try:
            data = self.socket.recv(self.maxPacketSize)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # an ICMP error (port or host unreachable) reported on the connected socket
            self.protocol.connectionRefused()
            return
        self.protocol.datagramReceived(data, self._connectedAddr)

    def startReading(self) -> None:
        """Read through the process's L{hub.Hub} (one reactor event for every ready socket), where epoll is."""
        if hub.AVAILABLE:
            hub.hub_for(self.reactor).update(self, True, False)
        else:
            super().startReading()

    def stopReading(self) -> None:
        if hub.AVAILABLE:
            hub.hub_for(self.reactor).update(self, False, False)
        else:
            super().stopReading()

    def discard_strangers(self) -> int:
        """
        Drop what reached the socket between its bind and its connect: the
        target has been sent nothing yet, so none of it is a reply, and the
        kernel keeps such datagrams queued after the connect.  How many.
        """
        dropped = 0
        while True:
            try:
                self.socket.recv(1)
            except OSError:  # EAGAIN once empty; an ICMP error shows again on send
                return dropped
            dropped += 1
