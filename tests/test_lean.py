"""
The lean transports (L{streamrelay.lean}) on real loopback sockets, in-process;
the splice engine over them; and, end to end, the system calls a short
connection through a plain route costs (strace on a real twistd).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionRefusedError,
    NotConnectingError,
    TimeoutError,
    UserError,
)
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from streamrelay import lean
from streamrelay.compat import listen_limited
from streamrelay.lean import LeanConnection, LeanConnector
from streamrelay.splice import Splice
from tests.harness import DEADLINE, Relay, poll, Target, free_port, recv_all, tcp_route, write_config
from tests.reactor import until
from tests.test_splice import EngineTests, Recorder, receive

MIB = 1 << 20


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """Records what its transport tells it."""

    def __init__(self) -> None:
        self.received = b""
        self.read_closed = False
        self.write_closed = False
        self.reason: Failure | None = None
        self.made: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        self.write_closed = True

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason
        self.lost.callback(None)


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class Accepting(Factory):
    """A route's factory as the listening port sees it: C{lean} says which transports its connections get."""

    def __init__(self, lean: bool) -> None:
        self.lean = lean
        self.accepted: list[Peer] = []

    def buildProtocol(self, addr: object) -> Peer:
        peer = Peer()
        self.accepted.append(peer)
        return peer


class LeanConnectionTests(TestCase):
    async def accept(self, lean: bool = True) -> tuple[Peer, socket.socket]:
        """A connection accepted by a L{LimitedPort} whose factory is (or is not) lean, and its client socket."""
        factory = Accepting(lean)
        port = listen_limited(reactor, 0, factory, lambda: 100, 50, "127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        client.setblocking(False)
        self.addCleanup(client.close)
        await until(lambda: factory.accepted)
        peer = factory.accepted[0]
        await peer.made
        return peer, client

    async def test_a_lean_factory_gets_lean_transports_with_the_options_inherited(self) -> None:
        peer, client = await self.accept()
        transport = peer.transport
        self.assertIsInstance(transport, LeanConnection)
        handle = transport.getHandle()  # type: ignore[union-attr]
        # Set on the listening socket only: Linux copies them into the accepted one.
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        self.assertTrue(handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        self.assertEqual(transport.getPeer().port, client.getsockname()[1])  # type: ignore[union-attr]
        self.assertEqual(transport.getHost().port, client.getpeername()[1])  # type: ignore[union-attr]
        client.sendall(b"hello")
        await until(lambda: peer.received == b"hello")

    async def test_other_factories_keep_twisteds_transports(self) -> None:
        peer, _ = await self.accept(lean=False)
        self.assertIsInstance(peer.transport, tcp.Server)

    async def test_a_full_buffer_pauses_the_producer_until_the_peer_reads(self) -> None:
        peer, client = await self.accept()
        transport = peer.transport
        producer = Producer()
        transport.registerProducer(producer, True)  # type: ignore[union-attr]
        payload = os.urandom(16 * MIB)  # more than both sockets' buffers hold
        for offset in range(0, len(payload), 256 * 1024):
            transport.write(payload[offset : offset + 256 * 1024])  # type: ignore[union-attr]
        self.assertEqual(producer.calls, ["pause"])
        self.assertEqual(await receive(client, len(payload)), payload)
        await until(lambda: producer.calls == ["pause", "resume"])
        transport.loseConnection()  # type: ignore[union-attr]
        await peer.lost
        self.assertTrue(peer.reason.check(ConnectionDone))  # type: ignore[union-attr]
        self.assertEqual(producer.calls, ["pause", "resume", "stop"])
        self.assertEqual(await receive(client, 1), b"")

    async def test_half_close_each_way(self) -> None:
        peer, client = await self.accept()
        transport = peer.transport
        transport.write(b"x" * MIB)  # type: ignore[union-attr]
        transport.loseWriteConnection()  # type: ignore[union-attr]
        self.assertEqual(await receive(client, 2 * MIB), b"x" * MIB)  # everything, then the FIN
        self.assertTrue(peer.write_closed)
        client.sendall(b"after our FIN")
        client.shutdown(socket.SHUT_WR)
        await until(lambda: peer.read_closed)
        self.assertEqual(peer.received, b"after our FIN")
        self.assertIsNone(peer.reason)  # half-closed both ways: the protocol decides when to close
        transport.loseConnection()  # type: ignore[union-attr]
        await peer.lost

    async def test_abort_resets_the_peer(self) -> None:
        peer, client = await self.accept()
        descriptors = len(os.listdir("/proc/self/fd"))
        peer.transport.write(b"never sent" * 100_000)  # type: ignore[union-attr]
        peer.transport.abortConnection()  # type: ignore[union-attr]
        self.assertIsNone(peer.reason)  # told at the reactor's next turn, as Twisted's transports do
        await peer.lost
        self.assertTrue(peer.reason.check(ConnectionAborted))  # type: ignore[union-attr]
        with self.assertRaises(ConnectionResetError):
            await receive(client, 100 * MIB)  # what was sent before the reset, then the reset
        self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors - 1)

    async def test_a_peer_reset_is_a_lost_connection(self) -> None:
        peer, client = await self.accept()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        client.close()
        await peer.lost
        self.assertFalse(peer.reason.check(ConnectionDone))  # type: ignore[union-attr]


class Dialing(ClientFactory):
    def __init__(self) -> None:
        self.peer = Peer()
        self.reasons: list[Failure] = []

    def buildProtocol(self, addr: object) -> Peer:
        return self.peer

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.reasons.append(reason)

    async def failure(self) -> Failure:
        """The attempt's one failure."""
        await until(lambda: self.reasons)
        [reason] = self.reasons
        return reason


class LeanConnectorTests(TestCase):
    async def test_a_connected_attempt_gets_a_lean_transport_with_the_options_set(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            dialing = Dialing()
            connector = lean.connect(reactor, "127.0.0.1", server.getsockname()[1], dialing, 5)
            self.assertFalse(dialing.peer.made.called)  # never within the caller's call
            await dialing.peer.made
            transport = dialing.peer.transport
            self.assertIsInstance(transport, LeanConnection)
            handle = transport.getHandle()  # type: ignore[union-attr]
            self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            self.assertTrue(handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
            with self.assertRaises(NotConnectingError):
                connector.stopConnecting()
            accepted, _ = server.accept()
            with accepted:
                transport.write(b"hello")  # type: ignore[union-attr]
                self.assertEqual(accepted.recv(5), b"hello")
                transport.loseConnection()  # type: ignore[union-attr]
                await dialing.peer.lost

    async def test_a_refused_attempt_fails_as_refused(self) -> None:
        dialing = Dialing()
        lean.connect(reactor, "127.0.0.1", free_port(), dialing, 5)
        reason = await dialing.failure()
        self.assertTrue(reason.check(ConnectionRefusedError))
        self.assertFalse(dialing.peer.made.called)

    async def test_an_unanswered_attempt_times_out(self) -> None:
        # A full accept queue: Linux drops further SYNs, so the handshake never completes.
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(0)
            address = server.getsockname()
            fillers = []
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(address)
                fillers.append(filler)
            try:
                dialing = Dialing()
                lean.connect(reactor, *address, dialing, 0.3)
                reason = await dialing.failure()
            finally:
                for filler in fillers:
                    filler.close()
        self.assertTrue(reason.check(TimeoutError))

    async def test_stop_connecting_fails_the_attempt_and_closes_its_socket(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            descriptors = len(os.listdir("/proc/self/fd"))
            dialing = Dialing()
            connector = lean.connect(reactor, "127.0.0.1", server.getsockname()[1], dialing, 5)
            connector.stopConnecting()
            reason = await dialing.failure()
            self.assertTrue(reason.check(UserError))
            self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors)
            await deferLater(reactor, 0, lambda: None)  # a turn of the reactor, where a connection would come
            self.assertFalse(dialing.peer.made.called)  # nor later


class LeanEngineTests(EngineTests):
    """The splice engine's own tests, over lean transports."""

    async def accept_two(self) -> list[tuple[Recorder, socket.socket]]:
        factory = Factory.forProtocol(Recorder)
        factory.accepted = []  # type: ignore[attr-defined]
        factory.lean = True  # type: ignore[attr-defined]
        port = listen_limited(reactor, 0, factory, lambda: 100, 50, "127.0.0.1")
        self.addCleanup(port.stopListening)
        peers = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(2)]
        for peer in peers:
            peer.setblocking(False)
            self.addCleanup(peer.close)
        await until(lambda: len(factory.accepted) == 2)  # type: ignore[attr-defined]
        by_port = {p.transport.getPeer().port: p for p in factory.accepted}  # type: ignore[attr-defined]
        for protocol in factory.accepted:  # type: ignore[attr-defined]
            self.assertIsInstance(protocol.transport, LeanConnection)
        return [(by_port[peer.getsockname()[1]], peer) for peer in peers]

    async def test_the_engine_drives_a_lean_connection_through_its_registration(self) -> None:
        (a, peer_a), (b, peer_b) = await self.accept_two()
        engine = Splice(reactor, a.transport, b.transport, lambda protocol, count: None)
        engine.start()
        self.assertIs(a.transport.driver, engine.ends[a])  # type: ignore[union-attr]
        self.assertIs(engine.ends[a].handle, a.transport)
        peer_a.sendall(b"ping")
        self.assertEqual(await receive(peer_b, 4), b"ping")
        engine.close(a)
        engine.close(b)
        await a.lost
        await b.lost
        for side in (a, b):
            transport = side.transport
            self.assertIsNone(transport.driver)  # type: ignore[union-attr]
            self.assertFalse(transport.reading or transport.writing)  # type: ignore[union-attr]


# -- end to end: what a short connection costs in system calls

_STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(?P<calls>\d+)\s+(?P<errors>\d*)\s*(?P<name>\w+)$")


def _strace_counts(path: Path) -> dict[str, tuple[int, int]]:
    """C{strace -c}'s table: calls and errors by system call."""
    counts = {}
    for line in path.read_text().splitlines():
        match = _STRACE_LINE.match(line)
        if match:
            counts[match["name"]] = (int(match["calls"]), int(match["errors"] or 0))
    return counts


def test_a_short_connection_through_a_plain_route_costs_few_system_calls(tmp_path: Path) -> None:
    """
    strace counts the relay's system calls over 300 short connections
    (request, reply, the target closes, then the client), one after another
    while another connection stays open (an idle relay's hub leaves the
    reactor with its last socket and comes back with the next, two more
    C{epoll_ctl}s):
    each kind is at most what the lean path needs (the closing note of
    issue 18 says what each is for), and no shutdown fails (Twisted's path
    paid two failing ones a connection, and a second connect).
    """
    assert shutil.which("strace"), "strace is not installed (.ci/run installs it)"
    connections = 300

    async def reply_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(100)
        writer.write(b"R" * 100)
        await writer.drain()

    trace = tmp_path / "strace.txt"
    with Target(reply_and_close) as target:
        config = write_config(tmp_path, "routes:\n" + tcp_route(target.port, "plain", splice="auto"))
        with Relay(config) as relay, socket.create_connection(("127.0.0.1", relay.ports["plain"])) as busy:
            busy.sendall(b"Q")  # held open throughout, as on a relay with work: the hub stays in the reactor
            poll(lambda: target.open_connections == 1)
            tracer = subprocess.Popen(
                ["strace", "-f", "-c", "-o", str(trace), "-p", str(relay.pid)],
                stderr=subprocess.PIPE, text=True,
            )
            try:
                assert tracer.stderr is not None
                assert "attached" in tracer.stderr.readline()  # "strace: Process N attached"
                for _ in range(connections):
                    with socket.create_connection(("127.0.0.1", relay.ports["plain"])) as client:
                        client.sendall(b"Q" * 100)
                        assert recv_all(client) == b"R" * 100
                relay.wait_for("closed", count=connections)
            finally:
                tracer.send_signal(signal.SIGINT)  # detaches, and writes the table
                tracer.wait(DEADLINE)
    counts = _strace_counts(trace)
    per_connection = {name: calls / connections for name, (calls, _) in counts.items()}
    assert per_connection["connect"] <= 1.05  # one (EINPROGRESS: strace's "error"), never a second to check
    assert counts["shutdown"][1] == 0 and per_connection["shutdown"] <= 2.05  # one FIN passed on each way
    assert per_connection["epoll_ctl"] <= 4.2  # two registrations made, two dropped
    assert per_connection["setsockopt"] <= 2.05  # the target's two options; the client's are inherited
    assert per_connection.get("fcntl", 0) < 0.1  # Twisted's close-on-exec calls are gone
    assert per_connection["ioctl"] <= 1.05  # the accepted socket made non-blocking
