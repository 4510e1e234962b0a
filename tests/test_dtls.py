"""
DTLS over UDP (L{streamrelay.dtls}) on real loopback sockets and the real
reactor: servers and clients from the module, with certificates from the
test CAs (RSA and ECDSA), against each other and against C{openssl
s_client} / C{s_server} (the system's OpenSSL 3.0, while pyOpenSSL brings
its own), plus a raw socket for the spoofed ClientHello and a lossy
forwarder for retransmission.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from streamrelay.dtls import (
    MAX_DATAGRAM, MTU, DTLSClient, DTLSHandshakeError, DTLSServer, DTLSSession, client_context, server_context,
)
from tests.reactor import until
from tests.tls_ca import KeyType, TestCA, ecdsa_ca, other_ca, tls_ca  # noqa: F401  (fixtures)

Address = tuple[str, int]

#: OpenSSL's SSL_OP_NO_EXTENDED_MASTER_SECRET (pyOpenSSL does not export it).
NO_EXTENDED_MASTER_SECRET = 1 << 0
#: The suite GoDoxy's agents offer.
GODOXY_SUITE = "ECDHE-ECDSA-AES128-GCM-SHA256"


class Echo:
    """A server-side handler: sends each datagram back; remembers why its session ended."""

    def __init__(self, session: DTLSSession, closed: list[str], echoed: list[bytes]) -> None:
        self.session = session
        self.closed = closed
        self.echoed = echoed

    def datagram_received(self, data: bytes) -> None:
        assert self.session.send(data)
        self.echoed.append(data)

    def session_closed(self, reason: str) -> None:
        self.closed.append(reason)


class Collector:
    """A client-side handler: keeps what arrives and why the session ended."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.closed: list[str] = []

    def datagram_received(self, data: bytes) -> None:
        self.received.append(data)

    def session_closed(self, reason: str) -> None:
        self.closed.append(reason)


class Pinger(Collector):
    """Sends C{expected} one datagram at a time, the next when the echo of the last arrives."""

    def start(self, client: DTLSClient, expected: list[bytes]) -> None:
        self.client, self.expected = client, expected
        assert client.send(expected[0])

    def datagram_received(self, data: bytes) -> None:
        super().datagram_received(data)
        if len(self.received) < len(self.expected):
            assert self.client.send(self.expected[len(self.received)])


class Lossy(DatagramProtocol):
    """Forwards between one client and C{server}, dropping the client's first C{drop} datagrams."""

    def __init__(self, server: Address, drop: int) -> None:
        self.server = server
        self.drop = drop
        self.client: Address | None = None
        self.hellos = 0

    @staticmethod
    def is_client_hello(datagram: bytes) -> bool:
        return datagram[0] == 22 and datagram[3:5] == b"\0\0" and datagram[13] == 1

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        assert self.transport is not None
        if addr == self.server:
            self.transport.write(datagram, self.client)
            return
        self.hellos += self.is_client_hello(datagram)
        if self.drop:
            self.client, self.drop = addr, self.drop - 1
        else:
            self.client = addr
            self.transport.write(datagram, self.server)


class DTLSTests(TestCase):
    @pytest.fixture(autouse=True)
    def authorities(self, tls_ca: TestCA, other_ca: TestCA, ecdsa_ca: TestCA) -> None:
        self.ca, self.other_ca, self.ecdsa_ca = tls_ca, other_ca, ecdsa_ca

    def serve(self, ca: TestCA | None = None, key_type: KeyType = "rsa", **options: Any) -> DTLSServer:
        """A listening echo server with a certificate for 127.0.0.1 and agent.example."""
        ca = ca or self.ca
        issued = ca.server("agent.example", "127.0.0.1", key_type=key_type)
        self.server_closed: list[str] = []
        self.echoed: list[bytes] = []
        self.refusals: list[tuple[Address, str]] = []
        server = DTLSServer(
            server_context(str(ca.cert), str(issued.cert), str(issued.key)),
            lambda session: Echo(session, self.server_closed, self.echoed),
            refused=lambda address, reason: self.refusals.append((address, reason)), **options,
        )
        reactor.listenUDP(0, server, interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(server.stop)
        return server

    def address(self, protocol: DatagramProtocol) -> Address:
        assert protocol.transport is not None
        host = protocol.transport.getHost()
        return host.host, host.port

    def client(
        self, address: Address, ca: TestCA | None = None, key_type: KeyType = "rsa",
        server_name: str = "agent.example", context: SSL.Context | None = None, handler: Collector | None = None,
        **options: Any,
    ) -> tuple[DTLSClient, Collector]:
        """A started client whose certificate comes from C{ca}; it trusts the test CA of C{key_type}."""
        if context is None:
            issued = (ca or self.ca).client("agent-client", key_type=key_type)
            trusted = self.ecdsa_ca if key_type == "ec" else self.ca
            context = client_context(str(trusted.cert), str(issued.cert), str(issued.key))
        handler = handler or Collector()
        client = DTLSClient(context, address, server_name, handler, **options)
        reactor.listenUDP(0, client, interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(client.stop)
        return client, handler

    async def test_echo_from_fifty_sessions_with_ecdsa(self) -> None:
        """1,000 datagrams from 50 sources, each its own session, on GoDoxy's suite."""
        server = self.serve(self.ecdsa_ca, "ec")
        issued = self.ecdsa_ca.client("agent-client", key_type="ec")
        clients: list[tuple[DTLSClient, Pinger]] = []
        for _ in range(50):
            context = client_context(str(self.ecdsa_ca.cert), str(issued.cert), str(issued.key))
            context.set_cipher_list(GODOXY_SUITE.encode())  # what GoDoxy's agents offer
            pinger = Pinger()
            client, _ = self.client(self.address(server), context=context, handler=pinger)
            clients.append((client, pinger))
        for client, _ in clients:
            await client.handshake
        self.assertEqual(len(server.peers), 50)
        self.assertEqual({self.address(client) for client, _ in clients}, set(server.peers))
        for session in server.peers.values():
            self.assertEqual(session.connection.get_cipher_name(), GODOXY_SUITE)
            self.assertEqual(session.connection.get_protocol_version_name(), "DTLSv1.2")
        for n, (client, handler) in enumerate(clients):
            handler.start(client, [f"{n}:{i}".encode() * (1 + i) for i in range(20)])
        await until(lambda: all(len(handler.received) == 20 for _, handler in clients))
        for _, handler in clients:
            self.assertEqual(handler.received, handler.expected)
        self.assertEqual(sum(len(handler.received) for _, handler in clients), 1000)

    async def test_openssl_s_client(self) -> None:
        """Another DTLS implementation (the system's OpenSSL) gets through the cookie exchange and is echoed."""
        server = self.serve(self.ecdsa_ca, "ec")
        issued = self.ecdsa_ca.client("agent-client", key_type="ec")
        host, port = self.address(server)
        command = ["openssl", "s_client", "-dtls1_2", "-connect", f"{host}:{port}", "-cert", str(issued.cert),
                   "-key", str(issued.key), "-CAfile", str(self.ecdsa_ca.cert), "-verify_return_error",
                   "-verify_hostname", "agent.example", "-quiet", "-ign_eof"]
        client = deferToThread(subprocess.run, command, input=b"hello\n", capture_output=True, timeout=10)
        await until(lambda: server.peers and self.echoed)
        next(iter(server.peers.values())).close("done")  # close_notify: s_client exits
        done = await client
        self.assertEqual((done.returncode, done.stdout), (0, b"hello\n"), done.stderr)
        self.assertEqual(self.server_closed, ["done"])

    async def test_openssl_s_server(self) -> None:
        """The client against the system's OpenSSL with its own cookie exchange (C{-listen})."""
        issued = self.ecdsa_ca.server("agent.example", key_type="ec")
        server = subprocess.Popen(
            ["openssl", "s_server", "-dtls1_2", "-listen", "-accept", "127.0.0.1:0", "-naccept", "1",
             "-cert", str(issued.cert), "-key", str(issued.key), "-Verify", "1", "-verify_return_error",
             "-CAfile", str(self.ecdsa_ca.cert)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.addCleanup(server.wait, 10)
        self.addCleanup(server.kill)
        assert server.stdin is not None and server.stdout is not None
        lines = [b""]
        while not lines[-1].startswith(b"ACCEPT "):
            lines.append(await deferToThread(server.stdout.readline))
            self.assertTrue(lines[-1], b"".join(lines))
        client, handler = self.client(("127.0.0.1", int(lines[-1].rsplit(b":", 1)[1])), self.ecdsa_ca, "ec")
        await client.handshake
        self.assertTrue(client.send(b"hello\n"))
        while lines[-1] != b"hello\n":  # s_server prints what it reads
            lines.append(await deferToThread(server.stdout.readline))
            self.assertTrue(lines[-1], b"".join(lines))
        server.stdin.write(b"reply\n")  # and sends what it is given
        server.stdin.flush()
        await until(lambda: handler.received)
        self.assertEqual(handler.received, [b"reply\n"])

    async def test_rsa_echo_and_the_record_limit(self) -> None:
        """RSA certificates work; a datagram of 2^14 bytes goes through, one byte more is refused."""
        server = self.serve()
        client, handler = self.client(self.address(server))
        await client.handshake
        self.assertFalse(client.send(b"x" * (MAX_DATAGRAM + 1)))
        self.assertFalse(client.send(b""))
        self.assertTrue(client.send(b"y" * MAX_DATAGRAM))
        await until(lambda: handler.received)
        self.assertEqual(handler.received, [b"y" * MAX_DATAGRAM])
        session = next(iter(server.peers.values()))
        self.assertFalse(session.send(b"z" * (MAX_DATAGRAM + 1)))

    async def test_client_certificate_from_another_ca_is_refused(self) -> None:
        server = self.serve()
        client, _ = self.client(self.address(server), ca=self.other_ca)
        with self.assertRaises(DTLSHandshakeError):
            await client.handshake
        await until(lambda: self.refusals)
        self.assertEqual(self.refusals, [(self.address(client), "unknown ca")])
        self.assertEqual(server.peers, {})

    async def test_no_client_certificate_is_refused(self) -> None:
        server = self.serve()
        context = SSL.Context(SSL.DTLS_CLIENT_METHOD)
        context.load_verify_locations(str(self.ca.cert))
        context.set_verify(SSL.VERIFY_PEER)
        client, _ = self.client(self.address(server), context=context)
        with self.assertRaises(DTLSHandshakeError):
            await client.handshake
        await until(lambda: self.refusals)
        self.assertIn("certificate", self.refusals[0][1])
        self.assertEqual(server.peers, {})

    async def test_extended_master_secret_is_required(self) -> None:
        server = self.serve()
        issued = self.ca.client("agent-client")
        context = client_context(str(self.ca.cert), str(issued.cert), str(issued.key))
        context.set_options(NO_EXTENDED_MASTER_SECRET)
        client, _ = self.client(self.address(server), context=context)
        with self.assertRaises(DTLSHandshakeError) as raised:
            await client.handshake
        self.assertEqual(str(raised.exception), "no extended master secret")
        await until(lambda: self.refusals)
        self.assertEqual(self.refusals, [(self.address(client), "no extended master secret")])
        self.assertEqual(server.peers, {})

    async def test_server_name_is_verified(self) -> None:
        server = self.serve()
        client, _ = self.client(self.address(server), server_name="elsewhere.example")
        with self.assertRaises(DTLSHandshakeError) as raised:
            await client.handshake
        self.assertIn("not elsewhere.example", str(raised.exception))

    async def test_spoofed_client_hello_keeps_no_state(self) -> None:
        """A ClientHello without the cookie gets a smaller HelloVerifyRequest and leaves no session."""
        server = self.serve()
        issued = self.ca.client("agent-client")
        hello_maker = SSL.Connection(client_context(str(self.ca.cert), str(issued.cert), str(issued.key)), None)
        hello_maker.set_ciphertext_mtu(MTU)
        hello_maker.set_connect_state()
        with self.assertRaises(SSL.WantReadError):
            hello_maker.do_handshake()
        hello = hello_maker.bio_read(65536)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(raw.close)
        raw.bind(("127.0.0.1", 0))
        raw.setblocking(False)
        replies: list[bytes] = []

        def receive() -> bool:
            try:
                replies.append(raw.recv(65536))
            except BlockingIOError:
                pass
            return len(replies) == 3

        for _ in range(3):
            raw.sendto(hello, self.address(server))
        await until(receive)
        for reply in replies:
            self.assertEqual((reply[0], reply[13]), (22, 3))  # handshake record, HelloVerifyRequest
            self.assertLess(len(reply), len(hello))
        self.assertEqual(server.peers, {})
        raw.sendto(b"\x17" + bytes(40), self.address(server))  # not a ClientHello at all
        await until(lambda: server.drops["not a ClientHello"] or server.drops["malformed"])
        self.assertEqual(server.peers, {})

    async def test_a_lost_first_flight_is_retransmitted(self) -> None:
        server = self.serve()
        lossy = Lossy(self.address(server), drop=1)
        reactor.listenUDP(0, lossy, interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(lambda: lossy.transport.stopListening() if lossy.transport else None)
        client, handler = self.client(self.address(lossy))
        await client.handshake
        self.assertEqual(lossy.drop, 0)
        # The lost one, its retransmission, the one with the cookie: no
        # second retransmission for a ServerHello the client took for a replay.
        self.assertEqual(lossy.hellos, 3)
        self.assertTrue(client.send(b"after a loss"))
        await until(lambda: handler.received)
        self.assertEqual(handler.received, [b"after a loss"])

    async def test_handshake_timeout(self) -> None:
        silent = DatagramProtocol()
        reactor.listenUDP(0, silent, interface="127.0.0.1")
        self.addCleanup(lambda: silent.transport.stopListening() if silent.transport else None)
        client, _ = self.client(self.address(silent), handshake_timeout=0.3)
        with self.assertRaises(DTLSHandshakeError) as raised:
            await client.handshake
        self.assertEqual(str(raised.exception), "handshake timeout")

    async def test_nobody_listening_fails_the_handshake_at_once(self) -> None:
        """The port-unreachable that tears a connected socket down (on epoll) ends the handshake."""
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        address = closed.getsockname()
        closed.close()
        client, _ = self.client(address)
        with self.assertRaises(DTLSHandshakeError) as raised:
            await client.handshake
        self.assertIn(str(raised.exception), {"socket closed", "connection refused"})

    async def test_idle_sessions_expire(self) -> None:
        server = self.serve(idle_timeout=0.5)
        client, handler = self.client(self.address(server))
        await client.handshake
        self.assertTrue(client.send(b"once"))
        await until(lambda: handler.received)
        self.assertEqual(len(server.peers), 1)
        await until(lambda: not server.peers)
        self.assertEqual(self.server_closed, ["idle"])
        await until(lambda: handler.closed)
        self.assertEqual(handler.closed, ["closed by peer"])  # the server's close_notify arrived

    async def test_the_peer_table_is_bounded(self) -> None:
        server = self.serve(max_peers=1)
        first, _ = self.client(self.address(server))
        await first.handshake
        second, _ = self.client(self.address(server), handshake_timeout=0.5)
        with self.assertRaises(DTLSHandshakeError):
            await second.handshake
        self.assertEqual(list(server.peers), [self.address(first)])
        self.assertGreater(server.drops["peer table full"], 0)

    async def test_stop_leaves_no_timers_or_sockets(self) -> None:
        server = self.serve()
        clients = [self.client(self.address(server)) for _ in range(3)]
        for client, _ in clients:
            await client.handshake
        await server.stop()
        self.assertEqual(server.peers, {})
        self.assertIsNone(server.transport)
        self.assertEqual(self.server_closed, ["shutdown"] * 3)
        await until(lambda: all(handler.closed for _, handler in clients))
        for client, handler in clients:
            self.assertEqual(handler.closed, ["closed by peer"])
            await client.stop()
            self.assertIsNone(client.transport)
        ours = [call for call in reactor.getDelayedCalls()
                if getattr(call.func, "__qualname__", "").startswith("DTLSSession.")]
        self.assertEqual(ours, [])
