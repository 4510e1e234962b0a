"""
Tests for L{streamrelay.inbound}: the inbound PROXY header policy, driven in
memory.  A L{StringTransportWithDisconnection} plays the TCP connection (the
test delivers bytes to whichever protocol the transport points at, as a
Twisted TCP transport does) and a L{MemoryReactorClock} drives the header
and detection deadlines.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from streamrelay import events
from streamrelay.config import ProxyProtocolConfig, parse_config
from streamrelay.events import RefusalLog, RouteEvents
from streamrelay.inbound import ProxyHeaderFactory, ProxyHeaderProtocol
from streamrelay.proxyproto import build_v1, build_v2

ROUTE = parse_config("routes:\n  r:\n    scheme: tcp4\n    port: '1:2'\n").routes[0]
TRUSTED = "127.0.0.1"
STRANGER = "198.51.100.99"
PEER_PORT = 40000
SOCKET_PEER = (TRUSTED, PEER_PORT)
SOCKET_HOST = ("127.0.0.1", 8000)
CLIENT = ("203.0.113.7", 4711)
ORIGINAL_DESTINATION = ("192.0.2.1", 443)
HEADER_V1 = build_v1(CLIENT, ORIGINAL_DESTINATION)
HEADER_V2 = build_v2(CLIENT, ORIGINAL_DESTINATION)
TIMEOUT = 3.0
DETECT_TIMEOUT = 0.3


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """The route's own protocol: records what the wrapper hands it."""

    def __init__(self) -> None:
        self.peer: IAddress | None = None
        self.host: IAddress | None = None
        self.received: list[bytes] = []
        self.half_closed = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        self.host = self.transport.getHost()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.half_closed = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class RecorderFactory(Factory):
    """Builds L{Recorder}s, or none at all if C{turn_down}."""

    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.addresses: list[IAddress | None] = []
        self.turn_down = False

    def buildProtocol(self, addr: IAddress | None) -> Recorder | None:
        self.addresses.append(addr)
        if self.turn_down:
            return None
        self.built.append(Recorder())
        return self.built[-1]


class Connection:
    """One accepted connection from C{peer_host}, through the wrapper."""

    def __init__(self, factory: ProxyHeaderFactory, peer_host: str) -> None:
        self.transport = StringTransportWithDisconnection(
            hostAddress=IPv4Address("TCP", *SOCKET_HOST), peerAddress=IPv4Address("TCP", peer_host, PEER_PORT)
        )
        self.wrapper = factory.buildProtocol(self.transport.getPeer())
        self.transport.protocol = self.wrapper
        self.wrapper.makeConnection(self.transport)

    def receive(self, data: bytes) -> None:
        """Deliver C{data} as the TCP transport would: to its current protocol."""
        self.transport.protocol.dataReceived(data)

    def eof(self) -> None:
        """The peer's FIN, as a TCP transport reports it to a half-closeable protocol."""
        IHalfCloseableProtocol(self.transport.protocol).readConnectionLost()

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)


class InboundTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.logged: list[dict[str, Any]] = []
        self.patch(events, "_log", Logger(namespace="streamrelay", observer=self.logged.append))
        self.inner = RecorderFactory()
        self.refusals = RefusalLog(RouteEvents(ROUTE), self.clock)

    def header_factory(self, mode: str) -> ProxyHeaderFactory:
        config = ProxyProtocolConfig(
            mode, (ipaddress.ip_network(TRUSTED),), timeout=TIMEOUT, detect_timeout=DETECT_TIMEOUT
        )
        return ProxyHeaderFactory(self.inner, config, self.refusals, self.clock)

    def connect(self, mode: str, peer_host: str = TRUSTED) -> Connection:
        return Connection(self.header_factory(mode), peer_host)

    def rejections(self) -> list[dict[str, Any]]:
        return [e for e in self.logged if e.get("action") == "rejected"]

    def assertRejected(self, connection: Connection, reason: str) -> None:
        """The connection was reset, one rejection counted, and nothing built."""
        self.assertTrue(connection.aborted)
        self.assertEqual(self.refusals.counts, {"rejected": 1})
        [event] = self.rejections()
        self.assertEqual(event["client"], f"{connection.transport.getPeer().host}:{PEER_PORT}")
        self.assertIn(reason, event["reason"])
        self.assertEqual(self.inner.built, [])

    def assertRelayed(self, connection: Connection, peer: tuple[str, int], host: tuple[str, int]) -> Recorder:
        """The connection went to a new inner protocol, which saw C{peer} and C{host}."""
        self.assertFalse(connection.aborted)
        [inner] = self.inner.built
        self.assertIs(connection.transport.protocol, inner)
        self.assertEqual((inner.peer, inner.host), (IPv4Address("TCP", *peer), IPv4Address("TCP", *host)))
        self.assertEqual(self.inner.addresses, [inner.peer])
        self.assertEqual(self.refusals.counts, {})
        return inner


class RequiredModeTests(InboundTestCase):
    def test_header_gives_the_addresses_and_the_rest_is_payload(self) -> None:
        connection = self.connect("required")
        connection.receive(HEADER_V1 + b"payload")
        inner = self.assertRelayed(connection, CLIENT, ORIGINAL_DESTINATION)
        self.assertEqual(inner.received, [b"payload"])
        connection.receive(b"more")
        self.assertEqual(inner.received, [b"payload", b"more"])

    def test_header_split_across_reads(self) -> None:
        connection = self.connect("required")
        for byte in HEADER_V2[:-1]:
            connection.receive(bytes([byte]))
        self.assertEqual(self.inner.built, [])
        self.assertIs(connection.transport.protocol, connection.wrapper)
        connection.receive(HEADER_V2[-1:] + b"after")
        inner = self.assertRelayed(connection, CLIENT, ORIGINAL_DESTINATION)
        self.assertEqual(inner.received, [b"after"])

    def test_header_without_payload_delivers_nothing(self) -> None:
        connection = self.connect("required")
        connection.receive(HEADER_V2)
        inner = self.assertRelayed(connection, CLIENT, ORIGINAL_DESTINATION)
        self.assertEqual(inner.received, [])

    def test_local_header_keeps_the_socket_addresses(self) -> None:
        connection = self.connect("required")
        connection.receive(build_v2(None, None, command="LOCAL") + b"ping")
        inner = self.assertRelayed(connection, SOCKET_PEER, SOCKET_HOST)
        self.assertEqual(inner.received, [b"ping"])

    def test_untrusted_peer_is_reset_at_once(self) -> None:
        changes: list[int] = []
        factory = self.header_factory("required")
        factory.changed = lambda: changes.append(len(factory.pending))
        connection = Connection(factory, STRANGER)
        self.assertRejected(connection, "untrusted peer")
        self.assertEqual((factory.pending, changes), (set(), []))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_invalid_header_is_rejected(self) -> None:
        connection = self.connect("required")
        connection.receive(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 80\r\n")
        self.assertRejected(connection, "invalid PROXY header: v1: port has a leading zero")

    def test_no_header_is_rejected(self) -> None:
        connection = self.connect("required")
        connection.receive(b"GET / HTTP/1.0\r\n")
        self.assertRejected(connection, "invalid PROXY header: no PROXY protocol signature")

    def test_header_timeout(self) -> None:
        connection = self.connect("required")
        connection.receive(HEADER_V1[:10])
        self.clock.advance(TIMEOUT - 0.01)
        self.assertFalse(connection.aborted)
        self.clock.advance(0.01)
        self.assertRejected(connection, "PROXY header timeout")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eof_before_the_header_is_complete(self) -> None:
        connection = self.connect("required")
        connection.receive(HEADER_V1[:10])
        connection.eof()
        self.assertRejected(connection, "closed before the PROXY header was complete")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pending_until_the_header_is_complete(self) -> None:
        """C{pending} counts against connection limits; C{changed} says when it moves."""
        factory = self.header_factory("required")
        changes: list[int] = []
        factory.changed = lambda: changes.append(len(factory.pending))
        connection = Connection(factory, TRUSTED)
        self.assertEqual((factory.pending, changes), ({connection.wrapper}, [1]))
        connection.receive(HEADER_V1)
        self.assertEqual((factory.pending, changes), (set(), [1, 0]))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_pending_aborts_the_waiting(self) -> None:
        factory = self.header_factory("required")
        waiting = Connection(factory, TRUSTED)
        done = Connection(factory, TRUSTED)
        done.receive(HEADER_V1)
        factory.close_pending()
        self.assertEqual((waiting.aborted, done.aborted), (True, False))
        self.assertEqual(factory.pending, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_while_waiting(self) -> None:
        factory = self.header_factory("required")
        connection = Connection(factory, TRUSTED)
        connection.transport.loseConnection()
        self.assertEqual(factory.pending, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.refusals.counts, {})

    def test_inner_factory_may_turn_the_connection_down(self) -> None:
        self.inner.turn_down = True
        connection = self.connect("required")
        connection.receive(HEADER_V1)
        self.assertTrue(connection.aborted)
        self.assertEqual((len(self.inner.addresses), self.refusals.counts), (1, {}))


class MixedModeTests(InboundTestCase):
    def test_untrusted_raw_peer_is_relayed_as_itself(self) -> None:
        connection = self.connect("mixed", STRANGER)
        connection.receive(b"GET / HTTP/1.0\r\n")
        inner = self.assertRelayed(connection, (STRANGER, PEER_PORT), SOCKET_HOST)
        self.assertEqual(inner.received, [b"GET / HTTP/1.0\r\n"])

    def test_untrusted_header_is_a_spoofing_attempt(self) -> None:
        factory = self.header_factory("mixed")
        connections = [Connection(factory, STRANGER) for _ in range(2)]
        for connection, header in zip(connections, (HEADER_V1, HEADER_V2)):
            connection.receive(header)
        self.assertEqual([c.aborted for c in connections], [True, True])
        self.assertEqual(self.refusals.counts, {"rejected": 2})
        self.assertIn("spoofing attempt", self.rejections()[0]["reason"])
        self.assertEqual(self.inner.built, [])

    def test_untrusted_header_spotted_once_its_signature_is_complete(self) -> None:
        connection = self.connect("mixed", STRANGER)
        connection.receive(b"PROX")
        self.assertFalse(connection.aborted)
        connection.receive(b"Y ")
        self.assertRejected(connection, "spoofing attempt")

    def test_trusted_peer_must_send_a_header(self) -> None:
        connection = self.connect("mixed")
        connection.receive(b"raw")
        self.assertRejected(connection, "no PROXY protocol signature")


class OptionalModeTests(InboundTestCase):
    def test_silent_peer_is_relayed_after_the_detect_timeout(self) -> None:
        """A server-speaks-first protocol (SSH, SMTP) is not stalled for the whole timeout."""
        connection = self.connect("optional")
        self.clock.advance(DETECT_TIMEOUT - 0.01)
        self.assertEqual(self.inner.built, [])
        self.clock.advance(0.01)
        inner = self.assertRelayed(connection, SOCKET_PEER, SOCKET_HOST)
        self.assertEqual(inner.received, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_byte_extends_the_wait_to_the_header_timeout(self) -> None:
        connection = self.connect("optional")
        connection.receive(HEADER_V1[:1])
        self.clock.advance(TIMEOUT - 0.01)
        self.assertEqual(self.inner.built, [])
        connection.receive(HEADER_V1[1:] + b"data")
        inner = self.assertRelayed(connection, CLIENT, ORIGINAL_DESTINATION)
        self.assertEqual(inner.received, [b"data"])

    def test_bytes_that_never_become_a_header_are_payload(self) -> None:
        connection = self.connect("optional")
        connection.receive(b"\r\n")  # could still be a v2 signature
        self.clock.advance(TIMEOUT)
        inner = self.assertRelayed(connection, SOCKET_PEER, SOCKET_HOST)
        self.assertEqual(inner.received, [b"\r\n"])

    def test_raw_data_is_relayed_at_once(self) -> None:
        connection = self.connect("optional")
        connection.receive(b"SSH-2.0-client\r\n")
        inner = self.assertRelayed(connection, SOCKET_PEER, SOCKET_HOST)
        self.assertEqual(inner.received, [b"SSH-2.0-client\r\n"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_header_from_a_trusted_peer_is_used(self) -> None:
        connection = self.connect("optional")
        connection.receive(HEADER_V2 + b"x")
        inner = self.assertRelayed(connection, CLIENT, ORIGINAL_DESTINATION)
        self.assertEqual(inner.received, [b"x"])

    def test_header_from_an_untrusted_peer_is_rejected(self) -> None:
        connection = self.connect("optional", STRANGER)
        connection.receive(HEADER_V2)
        self.assertRejected(connection, "spoofing attempt")

    def test_untrusted_silent_peer_waits_only_the_detect_timeout(self) -> None:
        connection = self.connect("optional", STRANGER)
        self.clock.advance(DETECT_TIMEOUT)
        self.assertRelayed(connection, (STRANGER, PEER_PORT), SOCKET_HOST)

    def test_eof_without_a_header_is_forwarded(self) -> None:
        """The half-close reaches the inner protocol, after what came before it."""
        connection = self.connect("optional")
        connection.receive(b"P")
        connection.eof()
        inner = self.assertRelayed(connection, SOCKET_PEER, SOCKET_HOST)
        self.assertEqual((inner.received, inner.half_closed), ([b"P"], True))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eof_inside_a_header_is_rejected(self) -> None:
        connection = self.connect("optional")
        connection.receive(HEADER_V1[:8])
        connection.eof()
        self.assertRejected(connection, "closed before the PROXY header was complete")


class AfterTheHeaderTests(InboundTestCase):
    def test_wrapper_is_the_inner_transport(self) -> None:
        """Writes go to the socket; the addresses are the header's."""
        connection = self.connect("required")
        connection.receive(HEADER_V1)
        [inner] = self.inner.built
        self.assertIsInstance(inner.transport, ProxyHeaderProtocol)
        inner.transport.write(b"reply")
        self.assertEqual(connection.transport.value(), b"reply")
        self.assertEqual(inner.transport.getPeer(), IPv4Address("TCP", *CLIENT))
        self.assertEqual(inner.transport.getHost(), IPv4Address("TCP", *ORIGINAL_DESTINATION))

    def test_ipv6_header_addresses(self) -> None:
        connection = self.connect("required")
        connection.receive(build_v1(("2001:db8::7", 1), ("2001:db8::1", 2)))
        [inner] = self.inner.built
        self.assertEqual((inner.peer, inner.host), (IPv6Address("TCP", "2001:db8::7", 1), IPv6Address("TCP", "2001:db8::1", 2)))

    def test_connection_lost_goes_to_the_inner_protocol(self) -> None:
        connection = self.connect("required")
        connection.receive(HEADER_V1)
        connection.transport.loseConnection()
        [inner] = self.inner.built
        self.assertIsNotNone(inner.lost)


class RefusalLogTests(InboundTestCase):
    def test_rejections_are_counted_and_logged_once_a_second(self) -> None:
        factory = self.header_factory("required")
        for _ in range(3):
            Connection(factory, STRANGER)
        self.assertEqual(self.refusals.counts, {"rejected": 3})
        self.assertEqual([e["suppressed"] for e in self.rejections()], [0])
        self.clock.advance(1)
        Connection(factory, STRANGER)
        self.assertEqual(self.refusals.counts, {"rejected": 4})
        self.assertEqual([e["suppressed"] for e in self.rejections()], [0, 2])
        self.assertEqual({e["client"] for e in self.rejections()}, {f"{STRANGER}:{PEER_PORT}"})
