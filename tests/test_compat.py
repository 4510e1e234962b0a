"""
Every Twisted internal that L{streamrelay.compat} relies on, pinned on the
real reactor and real loopback sockets, so that a Twisted upgrade that
changes one of them fails here, by name, rather than somewhere on the relay
path:

- C{tcp.Port.numberAccepts}, set by C{startListening} and read by
  C{tcp.Port.doRead} as the most connections it accepts in one call
  (L{compat.LimitedPort}, L{compat.listen_limited}), and C{tcp.Port}'s
  constructor taking a C{makeBinding} as its port (C{reuse_port});
- C{tcp.Connection.connectionLost} closing the socket and telling the
  protocol (L{compat.hand_back});
- C{tcp.Connection.protocol} being read on every event (L{compat.swap_protocol}),
  and found below wrappers that keep it as their C{transport} (L{compat.connection_under});
- C{udp.Port._connectedAddr}, C{socket}, C{maxPacketSize} and C{protocol},
  as L{compat.SessionPort.doRead} uses them.

C{tests/test_udp.py} (C{SessionPortTests}) already checks that a session's
socket drops what strangers sent before its connect and then delivers a
reply; it is not repeated here.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
from typing import Any, Callable

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from streamrelay import compat
from streamrelay.udp import MAX_DATAGRAM
from tests.reactor import until

DEADLINE = 10.0



def wait_readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], DEADLINE)[0], "nothing arrived"


def accept_queue(listening: socket.socket) -> int | None:
    """
    How many connections wait in C{listening}'s accept queue (Linux: a
    listening socket's C{tcpi_unacked}); C{None} where that cannot be asked.
    """
    if sys.platform != "linux":
        return None
    info = listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 24)[0])


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Records what its transport tells it."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason


def connection(protocol: Protocol) -> tcp.Connection:
    """The TCP connection under C{protocol}."""
    transport = protocol.transport
    assert isinstance(transport, tcp.Connection)
    return transport


class Accepting(Factory):
    """Builds a L{Recorder} for each accepted connection, and keeps it."""

    def __init__(self) -> None:
        self.accepted: list[Recorder] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        protocol = Recorder()
        protocol.factory = self
        self.accepted.append(protocol)
        return protocol


async def close_accepted(factory: Accepting) -> None:
    """Reset every connection C{factory} accepted, and wait until each is gone."""
    transports = [connection(protocol) for protocol in factory.accepted]
    for transport in transports:
        transport.abortConnection()  # nothing, if gone already
    await until(lambda: all(transport.disconnected for transport in transports))


class LimitedPortTests(TestCase):
    def listen(self, factory: Accepting, room: Callable[[], int]) -> compat.LimitedPort:
        port = compat.listen_limited(reactor, 0, factory, room=room, backlog=50, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: Deferred.fromCoroutine(close_accepted(factory)))
        return port

    def connect(self, port: tcp.Port, count: int) -> list[socket.socket]:
        """C{count} clients, every one in the accept queue when this returns."""
        address = ("127.0.0.1", port.getHost().port)
        clients = [socket.create_connection(address, timeout=DEADLINE) for _ in range(count)]
        for client in clients:
            self.addCleanup(client.close)
        queued = accept_queue(port.socket)
        if queued is not None:
            self.assertEqual(queued, count)
        return clients

    def test_a_listening_port_has_number_accepts(self) -> None:
        port = self.listen(Accepting(), room=lambda: 2)
        self.assertIsInstance(port, tcp.Port)
        self.assertIsInstance(port.numberAccepts, int)
        self.assertGreater(port.numberAccepts, 2)  # so capping it means something

    def test_a_binding_is_accepted_as_the_port(self) -> None:
        """C{reuse_port} with C{max_connections}: the service passes C{makeBinding(...)} as the port."""
        binding = tcp.makeBinding("127.0.0.1", 0, reuseAddress=True, reusePort=True)
        port = compat.listen_limited(reactor, binding, Accepting(), room=lambda: 1, backlog=50, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertEqual(port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        self.assertEqual(port.getHost().host, "127.0.0.1")
        self.assertNotEqual(port.getHost().port, 0)

    def test_do_read_accepts_no_more_than_number_accepts(self) -> None:
        """One C{doRead}, as the reactor makes it: capped at C{room()}."""
        factory = Accepting()
        port = self.listen(factory, room=lambda: 2)
        port.stopReading()  # the test makes the reactor's calls itself
        self.connect(port, 5)
        port.doRead()
        self.assertEqual(len(factory.accepted), 2)
        port.doRead()
        self.assertEqual(len(factory.accepted), 4)
        port.stopReading()

    def test_plain_port_honours_number_accepts(self) -> None:
        """The same, without the subclass: C{tcp.Port.doRead} itself reads the attribute."""
        factory = Accepting()
        port = tcp.Port(0, factory, 50, "127.0.0.1", reactor)
        port.startListening()
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: Deferred.fromCoroutine(close_accepted(factory)))
        port.stopReading()
        self.connect(port, 5)
        port.numberAccepts = 3
        port.doRead()
        self.assertEqual(len(factory.accepted), 3)
        port.stopReading()

    async def test_no_more_accepted_than_there_is_room_for(self) -> None:
        factory = Accepting()
        limit = [2]
        port = self.listen(factory, room=lambda: limit[0] - len(factory.accepted))
        self.connect(port, 5)
        # The reactor accepts what fits, then finds no room and stops reading.
        await until(lambda: port not in reactor.getReaders())
        self.assertEqual(len(factory.accepted), 2)
        limit[0] = 5
        port.startReading()
        await until(lambda: len(factory.accepted) == 5)
        self.assertEqual(len(factory.accepted), 5)


class ConnectionTests(TestCase):
    async def accept_one(self) -> tuple[Recorder, socket.socket]:
        factory = Accepting()
        port = tcp.Port(0, factory, 50, "127.0.0.1", reactor)
        port.startListening()
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: Deferred.fromCoroutine(close_accepted(factory)))
        peer = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=DEADLINE)
        self.addCleanup(peer.close)
        await until(lambda: factory.accepted)
        [protocol] = factory.accepted
        return protocol, peer

    async def test_hand_back_closes_the_socket_and_tells_the_protocol(self) -> None:
        protocol, peer = await self.accept_one()
        accepted = connection(protocol)
        sock = accepted.getHandle()
        accepted.stopReading()  # as the splice engine leaves it
        reason = Failure(ConnectionDone())
        compat.hand_back(accepted, reason)
        self.assertIs(protocol.reason, reason)
        self.assertEqual(sock.fileno(), -1)
        self.assertNotIn(accepted, reactor.getReaders() + reactor.getWriters())
        self.assertEqual(peer.recv(1), b"")  # an orderly close: a FIN

    async def test_hand_back_of_an_aborted_connection_resets_it(self) -> None:
        protocol, peer = await self.accept_one()
        reason = Failure(ConnectionAborted())
        compat.hand_back(connection(protocol), reason)
        self.assertIs(protocol.reason, reason)
        with self.assertRaises(ConnectionResetError):
            peer.recv(1)

    async def test_the_transport_delivers_to_its_protocol_attribute(self) -> None:
        first, peer = await self.accept_one()
        transport = connection(first)
        second = Recorder()
        compat.swap_protocol(transport, second)
        second.makeConnection(transport)
        self.assertIs(transport.protocol, second)
        peer.sendall(b"after the swap")
        await until(lambda: second.data == b"after the swap")
        peer.shutdown(socket.SHUT_WR)
        await until(lambda: second.eof)
        peer.close()
        transport.loseConnection()
        await until(lambda: second.reason is not None)
        self.assertEqual((first.data, first.eof, first.reason), (b"", False, None))

    async def test_the_connection_under_wrappers_that_keep_their_transport(self) -> None:
        protocol, peer = await self.accept_one()
        transport = connection(protocol)
        outer = ProtocolWrapper(WrappingFactory(Factory()), Recorder())
        outer.makeConnection(transport)
        innermost = Recorder()
        innermost.makeConnection(outer)  # a layer over the wrapper, as TLS over a PROXY header's reader
        self.assertIs(compat.connection_under(innermost.transport), transport)
        self.assertIs(compat.connection_under(transport), transport)
        peer.close()


class Datagrams(DatagramProtocol):
    """Records what its port tells it."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Any]] = []
        self.refused = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))

    def connectionRefused(self) -> None:
        self.refused += 1


class SessionPortTests(TestCase):
    """C{SessionPort} as C{udp.Port}'s subclass; see also C{tests/test_udp.py}."""

    def session(self, protocol: DatagramProtocol) -> compat.SessionPort:
        port = compat.SessionPort(0, protocol, "127.0.0.1", MAX_DATAGRAM, reactor)
        port.startListening()
        port.stopReading()  # the test makes the reactor's calls itself
        self.addCleanup(port.stopListening)
        return port

    def peer(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        return sock

    def test_connect_sets_the_connected_address(self) -> None:
        port = self.session(DatagramProtocol())
        self.assertIsNone(port._connectedAddr)
        target = self.peer()
        port.connect(*target.getsockname())
        self.assertEqual(port._connectedAddr, target.getsockname())
        self.assertEqual(port.maxPacketSize, MAX_DATAGRAM)
        self.assertEqual(port.socket.gettimeout(), 0.0)  # non-blocking: doRead never waits

    def test_do_read_reads_one_datagram_per_call(self) -> None:
        protocol = Datagrams()
        received = protocol.received
        port = self.session(protocol)
        target = self.peer()
        port.connect(*target.getsockname())
        address = ("127.0.0.1", port.getHost().port)
        for i in range(3):
            target.sendto(b"reply %d" % i, address)
        for i in range(3):
            wait_readable(port.socket)
            port.doRead()
            self.assertEqual(received, [(b"reply %d" % n, target.getsockname()) for n in range(i + 1)])
        port.doRead()  # nothing left: a quiet return
        self.assertEqual(len(received), 3)

    def test_a_refused_datagram_is_reported(self) -> None:
        protocol = Datagrams()
        port = self.session(protocol)
        closed = self.peer()
        address = closed.getsockname()
        closed.close()  # nobody listens there now
        port.connect(*address)
        port.write(b"anyone?")
        wait_readable(port.socket)  # the ICMP error
        port.doRead()
        self.assertEqual((protocol.refused, protocol.received), (1, []))
