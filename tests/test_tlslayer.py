"""
The TLS layer on real loopback sockets and the real reactor, against peers
that are not pyOpenSSL: Python's C{ssl} module (the system's OpenSSL) in a
thread, and C{openssl s_client} / C{s_server}.  A layer's inner protocol
here is an L{Inner}, standing in for a relay's side.
"""

from __future__ import annotations

import gc
import hashlib
import os
import selectors
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from streamrelay.config import TLSConfig, UpstreamTLSConfig
from streamrelay.tlscontext import client_context, server_context
from streamrelay.tlslayer import BUFFER_SIZE, TLSFacts, TLSHandshakeError, TLSLayer
from tests.tls_ca import Issued, TestCA, ecdsa_ca, other_ca, tls_ca  # noqa: F401  (fixtures)
from tests.reactor import until

MIB = 1 << 20
DEADLINE = 10.0
CHUNK = 65536



async def stalled(count: Callable[[], int], timeout: float = DEADLINE) -> int:
    """Let the reactor run until C{count()} stops growing for a while; its value then."""
    end = time.monotonic() + timeout
    value = -1
    while value != count():
        if time.monotonic() > end:
            raise AssertionError(f"still moving after {timeout}s")
        value = count()
        await deferLater(reactor, 0.25)
    return value


@implementer(IHalfCloseableProtocol, IPushProducer)
class Inner(Protocol):
    """
    The protocol above a layer: counts and hashes what it reads, echoes it
    if asked, answers a FIN with C{reply} and its own FIN, and can stream
    C{source} out as a push producer, as a relay's side does.
    """

    def __init__(self, echo: bool = False, reply: bytes | None = None, source: bytes = b"") -> None:
        self.echo = echo
        self.reply = reply
        self.source = memoryview(source)
        self.offset = 0
        self.paused = False
        self.received = 0
        self.digest = hashlib.sha256()
        self.data = b""  # the first few bytes, for short exchanges
        self.events: list[str] = []
        self.arrived: Deferred[None] = Deferred()  # first bytes
        self.eof: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.events.append("connected")
        if self.source:
            self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        if len(self.data) < 4096:
            self.data += data
        if not self.arrived.called:
            self.arrived.callback(None)
        if self.echo:
            self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.events.append("eof")
        if self.reply is not None:
            self.transport.write(self.reply)  # type: ignore[union-attr]
            self.transport.loseWriteConnection()  # type: ignore[union-attr]
        self.eof.callback(None)

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.events.append("lost")
        self.reason = reason
        self.lost.callback(None)

    # -- streaming C{source}

    def pump(self) -> None:
        while not self.paused and self.offset < len(self.source):
            chunk = self.source[self.offset : self.offset + CHUNK]
            self.offset += len(chunk)
            self.transport.write(chunk)  # type: ignore[union-attr]  # may pause us
        if self.offset == len(self.source) and self.source:
            self.source = memoryview(b"")
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.paused = True


def echo_until_eof() -> Inner:
    """Echoes, and answers the peer's end with its own."""
    return Inner(echo=True, reply=b"")


def outcome(layer: TLSLayer) -> Deferred[TLSFacts | Exception]:
    """The layer's handshake, as its facts or the exception (never a failure to trap)."""
    settled: Deferred[TLSFacts | Exception] = Deferred()
    layer.handshake.addBoth(lambda r: settled.callback(r.value if isinstance(r, Failure) else r))
    return settled


def server_tls(issued: Issued, **fields: Any) -> TLSConfig:
    return TLSConfig(cert=str(issued.cert), key=str(issued.key), **fields)


def client_ssl(ca: TestCA, *, alpn: list[str] | None = None, cert: Issued | None = None,
               maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.maximum_version = maximum
    if alpn:
        context.set_alpn_protocols(alpn)
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


def exchange(port: int, context: ssl.SSLContext, payload: bytes, half_close: bool = False) -> bytes:
    """Connect, send C{payload} (then a FIN), read until the server closes (in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        with wrap(raw, context) as tls:
            tls.sendall(payload)
            if half_close:
                shutdown_write(tls)
            chunks = []
            while chunk := tls.recv(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)


def wrap(raw: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
    """The client's end, handshake done (it then owns C{raw}'s descriptor)."""
    return context.wrap_socket(raw, server_hostname="db.example")


def shutdown_write(tls: ssl.SSLSocket) -> None:
    """A FIN under the TLS (C{SSLSocket.shutdown} would drop the TLS session)."""
    with socket.fromfd(tls.fileno(), socket.AF_INET, socket.SOCK_STREAM) as same:
        same.shutdown(socket.SHUT_WR)


def pump_handshake(raw: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
    """Drive an C{SSLObject}'s handshake over a blocking socket."""
    while True:
        try:
            tls.do_handshake()
            raw.sendall(outgoing.read())
            return
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            incoming.write(raw.recv(CHUNK))


def duplex(port: int, context: ssl.SSLContext, upload: bytes) -> str:
    """
    Send C{upload} while reading everything the server sends, then close
    (a FIN, no close_notify); the SHA-256 of what was read.
    """
    digest = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw, wrap(raw, context) as tls:
        tls.setblocking(False)
        view, sent, finished = memoryview(upload), 0, False
        with selectors.DefaultSelector() as selector:
            selector.register(tls, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while not finished or sent < len(upload):
                if not selector.select(DEADLINE):
                    raise AssertionError("stalled")
                try:
                    while chunk := tls.recv(4 * CHUNK):
                        digest.update(chunk)
                    finished = True  # the server's close_notify
                    selector.modify(tls, selectors.EVENT_WRITE)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                if sent < len(upload):
                    try:
                        sent += tls.send(view[sent : sent + 4 * CHUNK])
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                    if sent == len(upload):
                        selector.modify(tls, selectors.EVENT_READ)
    return digest.hexdigest()


class ServerSideTests(TestCase):
    """Layers that terminate TLS from clients (C{server=True})."""

    @pytest.fixture(autouse=True)
    def authorities(self, tls_ca: TestCA, other_ca: TestCA, ecdsa_ca: TestCA) -> None:
        self.ca, self.other_ca, self.ecdsa_ca = tls_ca, other_ca, ecdsa_ca
        self.issued = tls_ca.server("db.example", "127.0.0.1")

    def serve(self, tls: TLSConfig, inner: Callable[[], Inner] = Inner,
              timeout: float = DEADLINE) -> tuple[int, DeferredQueue[tuple[TLSLayer, Inner]]]:
        """Listen on loopback with a layer per connection; accepted ones are queued."""
        context = server_context(tls)
        accepted: DeferredQueue[tuple[TLSLayer, Inner]] = DeferredQueue()

        def build(addr: object) -> TLSLayer:
            protocol = inner()
            layer = TLSLayer(protocol, context, server=True, reactor=reactor, handshake_timeout=timeout)
            reactor.callLater(0, accepted.put, (layer, protocol))  # once connected
            return layer

        factory = Factory()
        factory.buildProtocol = build  # type: ignore[method-assign]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, accepted

    async def test_handshake_facts_and_echo(self) -> None:
        port, accepted = self.serve(server_tls(self.issued, alpn=("h2", "http/1.1")), echo_until_eof)
        client = deferToThread(self.echo_once, port, client_ssl(self.ca, alpn=["http/1.1", "h2"]))
        layer, inner = await accepted.get()
        self.assertEqual(inner.events, ["connected"])  # at accept, before any handshake
        facts = await outcome(layer)
        self.assertEqual(await client, b"ping")
        assert isinstance(facts, TLSFacts)
        self.assertEqual(
            (facts.version, facts.server_name, facts.alpn, facts.client_cert, facts.client_verified, facts.client_cn),
            ("TLSv1.3", "db.example", "h2", False, False, None),
        )
        self.assertTrue(facts.cipher.startswith("TLS_"), facts.cipher)
        self.assertEqual((facts.sig_alg, facts.key_alg), ("RSA-SHA256", "RSA2048"))
        self.assertIs(layer.facts, facts)
        await inner.lost
        self.assertEqual(inner.events, ["connected", "eof", "lost"])

    @staticmethod
    def echo_once(port: int, context: ssl.SSLContext) -> bytes:
        """Send a ping, read the echo, close our side with close_notify, read to the end."""
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw, wrap(raw, context) as tls:
            tls.sendall(b"ping")
            echoed = tls.recv(4)
            tls.unwrap()  # close_notify, then the inner's (echo_until_eof)
            return echoed

    async def test_an_echo_costs_one_write_per_read(self) -> None:
        """Whatever the inner protocol writes while a read is handled leaves in one write, after it."""
        port, accepted = self.serve(server_tls(self.issued), echo_until_eof)
        payload = os.urandom(4 * MIB)
        client = deferToThread(exchange, port, client_ssl(self.ca), payload, half_close=True)
        layer, inner = await accepted.get()
        transport = layer.transport
        counts = {"reads": 0, "writes": 0}
        read, write = layer.dataReceived, transport.write

        def counting_read(data: bytes) -> None:
            counts["reads"] += 1
            read(data)

        def counting_write(data: bytes) -> None:
            counts["writes"] += 1
            write(data)

        layer.dataReceived = counting_read  # type: ignore[method-assign]
        transport.write = counting_write  # type: ignore[method-assign]
        self.assertEqual(await client, payload)
        await inner.lost
        self.assertGreater(counts["reads"], 4 * MIB // (2 * CHUNK))
        self.assertLessEqual(counts["writes"], counts["reads"] + 1)  # and the close_notify after the FIN

    async def test_ecdsa_certificate_over_tls_1_2_without_alpn_in_common(self) -> None:
        issued = self.ecdsa_ca.server("db.example", key_type="ec")
        port, accepted = self.serve(server_tls(issued, alpn=("h2",)), echo_until_eof)
        context = client_ssl(self.ecdsa_ca, alpn=["imap"], maximum=ssl.TLSVersion.TLSv1_2)
        client = deferToThread(self.echo_once, port, context)
        layer, inner = await accepted.get()
        facts = await outcome(layer)
        self.assertEqual(await client, b"ping")
        assert isinstance(facts, TLSFacts)
        self.assertEqual((facts.version, facts.alpn), ("TLSv1.2", None))
        self.assertTrue(facts.cipher.startswith("ECDHE-ECDSA-"), facts.cipher)
        self.assertEqual((facts.sig_alg, facts.key_alg), ("ecdsa-with-SHA256", "EC256"))
        await inner.lost

    async def test_openssl_s_client(self) -> None:
        port, accepted = self.serve(server_tls(self.issued), lambda: Inner(echo=True))
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "db.example",
                   "-CAfile", str(self.ca.cert), "-verify_return_error", "-verify_hostname", "db.example",
                   "-quiet", "-ign_eof"]
        client = deferToThread(subprocess.run, command, input=b"hello\n", capture_output=True, timeout=DEADLINE)
        layer, inner = await accepted.get()
        await until(lambda: inner.received == 6)
        layer.loseConnection()  # after the echo: close_notify, then the end
        done = await client
        self.assertEqual((done.returncode, done.stdout), (0, b"hello\n"), done.stderr)
        facts = await outcome(layer)
        assert isinstance(facts, TLSFacts)
        self.assertEqual(facts.server_name, "db.example")
        await inner.lost

    # -- client certificates

    async def handshake_failure(self, tls: TLSConfig, context: ssl.SSLContext) -> tuple[str, str]:
        """The layer's reason and the client's error for a handshake the layer refuses."""

        def connect() -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
                try:
                    with wrap(raw, context) as tls:
                        tls.sendall(b"x")
                        tls.recv(1)  # TLS 1.3: the client's handshake is done before the server's verdict
                except ssl.SSLError as e:
                    return e.reason or ""
            return "no error"

        port, accepted = self.serve(tls)
        client = deferToThread(connect)
        layer, inner = await accepted.get()
        error = await outcome(layer)
        self.assertIsInstance(error, TLSHandshakeError)
        await inner.lost
        self.assertEqual(inner.received, 0)
        return str(error), await client

    async def test_require_without_a_certificate(self) -> None:
        tls = server_tls(self.issued, client_ca=str(self.ca.cert), verify_client="require")
        reason, seen = await self.handshake_failure(tls, client_ssl(self.ca))
        self.assertEqual(reason, "client certificate required but none sent")
        self.assertEqual(seen, "TLSV13_ALERT_CERTIFICATE_REQUIRED")

    async def test_require_with_a_certificate_from_an_unknown_ca(self) -> None:
        stranger = self.other_ca.client("mallory")
        tls = server_tls(self.issued, client_ca=str(self.ca.cert), verify_client="require")
        reason, seen = await self.handshake_failure(tls, client_ssl(self.ca, cert=stranger))
        self.assertEqual(reason, "certificate verify failed: unknown ca")
        self.assertEqual(seen, "TLSV1_ALERT_UNKNOWN_CA")

    async def test_optional_lets_clients_without_certificates_in_and_verifies_those_with(self) -> None:
        tls = server_tls(self.issued, client_ca=str(self.ca.cert), verify_client="optional")
        port, accepted = self.serve(tls, echo_until_eof)
        found = []
        for cert in (None, self.ca.client("alice")):
            client = deferToThread(self.echo_once, port, client_ssl(self.ca, cert=cert))
            layer, inner = await accepted.get()
            found.append(await outcome(layer))
            self.assertEqual(await client, b"ping")
            await inner.lost
        without, alice = found
        assert isinstance(without, TLSFacts) and isinstance(alice, TLSFacts)
        self.assertEqual((without.client_cert, without.client_verified, without.client_cn), (False, False, None))
        self.assertEqual((alice.client_cert, alice.client_verified, alice.client_cn), (True, True, "alice"))

    # -- failing handshakes

    async def test_handshake_timeout(self) -> None:
        port, accepted = self.serve(server_tls(self.issued), timeout=0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
            layer, inner = await accepted.get()
            started = time.monotonic()
            error = await outcome(layer)
            self.assertEqual(str(error), "handshake timeout")
            self.assertLess(time.monotonic() - started, 2.0)
            await inner.lost
            self.assertEqual(raw.recv(1), b"")  # closed

    async def test_garbage_a_protocol_mismatch_and_a_peer_that_leaves(self) -> None:
        def talk(port: int, payload: bytes) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
                raw.sendall(payload)
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(CHUNK):
                    pass

        def old_client(port: int) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
                with self.assertRaises(ssl.SSLError):
                    wrap(raw, client_ssl(self.ca, maximum=ssl.TLSVersion.TLSv1_2))

        port, accepted = self.serve(server_tls(self.issued, min_version="1.3"))
        cases: list[tuple[Callable[[int], None], str]] = [
            (lambda port: talk(port, b"GET / HTTP/1.1\r\nHost: db.example\r\n\r\n"), "not TLS (an HTTP request)"),
            (lambda port: talk(port, b"SSH-2.0-OpenSSH_9.6\r\n"), "not TLS"),
            (old_client, "no TLS version in common"),
            (lambda port: talk(port, b""), "peer closed during handshake"),
        ]
        for client, expected in cases:
            talking = deferToThread(client, port)
            layer, inner = await accepted.get()
            self.assertEqual(str(await outcome(layer)), expected)
            await talking
            await inner.lost

    # -- before the handshake completes

    async def test_writes_and_a_close_before_the_handshake_wait_for_it(self) -> None:
        banner = os.urandom(BUFFER_SIZE + 1000)

        @implementer(IPushProducer)
        class Producer:
            def __init__(self) -> None:
                self.events: list[str] = []

            def pauseProducing(self) -> None:
                self.events.append("pause")

            def resumeProducing(self) -> None:
                self.events.append("resume")

            def stopProducing(self) -> None:
                self.events.append("stop")

        class Greeter(Inner):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.transport.pauseProducing()  # type: ignore[union-attr]  # must not stall the handshake
                self.producer = Producer()
                self.transport.registerProducer(self.producer, True)  # type: ignore[union-attr]
                self.transport.write(banner[:1000])  # type: ignore[union-attr]
                self.transport.write(banner[1000:])  # type: ignore[union-attr]
                self.transport.unregisterProducer()  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

        port, accepted = self.serve(server_tls(self.issued), Greeter)
        client = deferToThread(exchange, port, client_ssl(self.ca), b"")
        layer, inner = await accepted.get()
        self.assertEqual(layer.held, len(banner))
        self.assertEqual(inner.producer.events, ["pause"])  # pending reached BUFFER_SIZE
        self.assertIsInstance(await outcome(layer), TLSFacts)
        self.assertEqual(await client, banner)
        await inner.lost
        self.assertEqual(layer.held, 0)

    # -- half-close

    async def test_close_notify_and_fin_from_the_client_then_the_reply(self) -> None:
        """TLS 1.3: the client's close_notify and FIN end only its direction."""

        def client(port: int) -> bytes:
            context = client_ssl(self.ca)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing, server_hostname="db.example")
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
                pump_handshake(raw, tls, incoming, outgoing)
                tls.write(b"request")
                try:
                    tls.unwrap()  # close_notify; the server's is still to come
                except ssl.SSLWantReadError:
                    pass
                raw.sendall(outgoing.read())
                raw.shutdown(socket.SHUT_WR)
                reply = b""
                while True:
                    try:
                        reply += tls.read(CHUNK)
                    except ssl.SSLWantReadError:
                        data = raw.recv(CHUNK)
                        if not data:
                            return reply
                        incoming.write(data)
                    except ssl.SSLZeroReturnError:
                        return reply + b" <close_notify>"

        port, accepted = self.serve(server_tls(self.issued), lambda: Inner(reply=b"reply"))
        answered = deferToThread(client, port)
        layer, inner = await accepted.get()
        await inner.eof
        self.assertEqual(inner.data, b"request")
        self.assertEqual(await answered, b"reply <close_notify>")
        await inner.lost
        self.assertEqual(inner.events, ["connected", "eof", "lost"])
        assert inner.reason is not None
        self.assertIsInstance(inner.reason.value, ConnectionDone)

    async def test_a_fin_without_close_notify_is_a_half_close_too(self) -> None:
        def client(port: int) -> bytes:
            raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            with wrap(raw, client_ssl(self.ca)) as tls:
                tls.sendall(b"request")
                shutdown_write(tls)  # under TLS: no close_notify
                chunks = []
                while chunk := tls.recv(CHUNK):
                    chunks.append(chunk)
                return b"".join(chunks)

        port, accepted = self.serve(server_tls(self.issued), lambda: Inner(reply=b"reply"))
        answered = deferToThread(client, port)
        layer, inner = await accepted.get()
        await inner.eof
        self.assertEqual(await answered, b"reply")
        await inner.lost
        self.assertEqual(inner.events, ["connected", "eof", "lost"])

    # -- volume and flow control

    async def test_16_mib_each_way(self) -> None:
        upload, download = os.urandom(16 * MIB), os.urandom(16 * MIB)
        port, accepted = self.serve(server_tls(self.issued), lambda: Inner(source=download))
        started, cpu = time.monotonic(), time.thread_time()
        client = deferToThread(duplex, port, client_ssl(self.ca), upload)
        layer, inner = await accepted.get()
        await outcome(layer)
        inner.pump()
        received = await client
        await inner.eof
        wall, reactor_cpu = time.monotonic() - started, time.thread_time() - cpu
        self.assertEqual(received, hashlib.sha256(download).hexdigest())
        self.assertEqual(inner.digest.hexdigest(), hashlib.sha256(upload).hexdigest())
        print(f"\n32 MiB through the layer in {wall:.2f}s, reactor thread CPU {reactor_cpu:.2f}s")
        await inner.lost
        self.assertEqual(inner.events, ["connected", "write closed", "eof", "lost"])

    async def test_a_paused_reader_stops_the_socket_and_the_layer_holds_nothing(self) -> None:
        upload = os.urandom(8 * MIB)

        class Stalling(Inner):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                if self.received >= MIB and self.received - len(data) < MIB:
                    self.paused = True
                    self.transport.pauseProducing()  # type: ignore[union-attr]

        port, accepted = self.serve(server_tls(self.issued), Stalling)
        sent = [0]

        def send() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
                with wrap(raw, client_ssl(self.ca)) as tls:
                    view = memoryview(upload)
                    while sent[0] < len(upload):
                        sent[0] += tls.send(view[sent[0] : sent[0] + CHUNK])
                    shutdown_write(tls)
                    while tls.recv(CHUNK):  # until the server closes: closing with unread bytes resets
                        pass

        sending = deferToThread(send)
        layer, inner = await accepted.get()
        await until(lambda: inner.paused)
        at_pause = inner.received
        await stalled(lambda: sent[0])  # the client filled the kernel's buffers
        self.assertEqual(inner.received, at_pause)  # nothing read, nothing decrypted
        self.assertLess(at_pause, MIB + 2 * CHUNK)  # at most one read beyond the pause
        self.assertEqual(layer.held, 0)
        self.assertNotIn(layer.transport, reactor.getReaders())
        self.assertLess(sent[0], len(upload))
        inner.paused = False
        layer.resumeProducing()
        await inner.eof
        self.assertEqual(inner.digest.hexdigest(), hashlib.sha256(upload).hexdigest())
        inner.transport.loseConnection()  # type: ignore[union-attr]
        await sending
        await inner.lost

    async def test_a_client_that_does_not_read_pauses_the_writer(self) -> None:
        download = os.urandom(16 * MIB)
        port, accepted = self.serve(server_tls(self.issued), lambda: Inner(source=download))
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHUNK)  # no autotuning to swallow it all
        raw.settimeout(DEADLINE)
        raw.connect(("127.0.0.1", port))
        tls = await deferToThread(wrap, raw, client_ssl(self.ca))
        self.addCleanup(tls.close)
        layer, inner = await accepted.get()
        await outcome(layer)
        inner.pump()
        await stalled(lambda: inner.offset)
        self.assertTrue(inner.paused)
        transport = layer.transport
        self.assertEqual(layer.held, 0)
        # Twisted's own write buffer (internals, read only): about bufferSize, as for plain TCP.
        buffered = len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[attr-defined]
        self.assertLessEqual(buffered, transport.bufferSize + CHUNK + 1024)  # type: ignore[attr-defined]
        self.assertLess(inner.offset, len(download))

        def read_all() -> str:
            digest = hashlib.sha256()
            while chunk := tls.recv(CHUNK):
                digest.update(chunk)
            return digest.hexdigest()

        self.assertEqual(await deferToThread(read_all), hashlib.sha256(download).hexdigest())
        tls.close()
        await inner.lost


def serve_once(listener: socket.socket, context: ssl.SSLContext, handle: Callable[[ssl.SSLSocket], Any]) -> Any:
    """Accept one TLS client (in a thread) and return what C{handle} makes of it, or the TLS error."""
    listener.settimeout(DEADLINE)
    raw, _ = listener.accept()
    with raw:
        try:
            with context.wrap_socket(raw, server_side=True) as tls:
                return handle(tls)
        except ssl.SSLError as e:
            return e


def echo_until_close_notify(tls: ssl.SSLSocket) -> bytes:
    """Echo until the client's close_notify, then send ours."""
    received = b""
    while data := tls.recv(CHUNK):
        received += data
        tls.sendall(data)
    tls.unwrap()
    return received


class ClientSideTests(TestCase):
    """Layers that originate TLS to a target (C{server=False})."""

    @pytest.fixture(autouse=True)
    def authorities(self, tls_ca: TestCA, other_ca: TestCA, ecdsa_ca: TestCA) -> None:
        self.ca, self.other_ca, self.ecdsa_ca = tls_ca, other_ca, ecdsa_ca

    def target(self, issued: Issued, handle: Callable[[ssl.SSLSocket], Any],
               configure: Callable[[ssl.SSLContext], None] = lambda context: None) -> tuple[int, Deferred[Any]]:
        """A Python C{ssl} server for one client, with C{issued} as its certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        configure(context)
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        return listener.getsockname()[1], deferToThread(serve_once, listener, context, handle)

    async def connect(self, port: int, upstream: UpstreamTLSConfig, inner: Inner,
                      server_name: str = "db.example") -> tuple[TLSLayer, Deferred[str]]:
        """A client-side layer over a connection to C{port}; the Deferred is its C{on_failure}."""
        failed: Deferred[str] = Deferred()
        layer = TLSLayer(
            inner, client_context(upstream), server=False, reactor=reactor, handshake_timeout=DEADLINE,
            server_name=server_name, verify=upstream.verify, on_failure=failed.callback,
        )
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), layer)
        return layer, failed

    async def test_the_inner_protocol_connects_after_a_verified_handshake(self) -> None:
        names: list[str | None] = []

        def configure(context: ssl.SSLContext) -> None:
            context.set_alpn_protocols(["h2"])
            context.sni_callback = lambda tls, name, context: names.append(name)  # type: ignore[assignment,misc]

        port, served = self.target(self.ca.server("db.example"), echo_until_close_notify, configure)

        class Checking(Inner):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.facts = layer.facts  # already there
                self.transport.write(b"ping")  # type: ignore[union-attr]

        inner = Checking(reply=b"")
        upstream = UpstreamTLSConfig(ca=str(self.ca.cert), alpn=("http/1.1", "h2"))
        layer, failed = await self.connect(port, upstream, inner)
        self.assertEqual(inner.events, [])  # not before the handshake
        await inner.arrived
        self.assertEqual(inner.data, b"ping")
        facts = inner.facts
        self.assertIsInstance(facts, TLSFacts)
        self.assertEqual((facts.version, facts.server_name, facts.alpn), ("TLSv1.3", "db.example", "h2"))
        self.assertEqual((facts.client_cert, facts.client_verified, facts.client_cn), (True, True, "db.example"))
        layer.loseWriteConnection()  # close_notify: the target stops echoing and answers with its own
        self.assertEqual(await served, b"ping")
        await inner.lost
        self.assertEqual(inner.events, ["connected", "write closed", "eof", "lost"])
        self.assertEqual(names, ["db.example"])
        self.assertFalse(failed.called)

    async def test_openssl_s_server_asking_for_a_client_certificate(self) -> None:
        issued = self.ecdsa_ca.server("db.example", key_type="ec")
        client = self.ecdsa_ca.client("relay", key_type="ec")
        server = subprocess.Popen(
            ["openssl", "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", "-rev", "-cert", str(issued.cert),
             "-key", str(issued.key), "-Verify", "1", "-verify_return_error", "-CAfile", str(self.ecdsa_ca.cert)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.addCleanup(server.wait, DEADLINE)
        self.addCleanup(server.kill)
        assert server.stdout is not None
        line = b""
        while not line.startswith(b"ACCEPT "):  # after "verify depth is 1, ..."
            line = await deferToThread(server.stdout.readline)
            self.assertTrue(line, "s_server exited")
        port = int(line.rsplit(b":", 1)[1])
        upstream = UpstreamTLSConfig(ca=str(self.ecdsa_ca.cert), cert=str(client.cert), key=str(client.key))
        inner = Inner()
        layer, failed = await self.connect(port, upstream, inner)
        await until(lambda: inner.events)
        layer.write(b"hello\n")
        await until(lambda: b"olleh" in inner.data)
        facts = layer.facts
        assert facts is not None
        self.assertEqual((facts.sig_alg, facts.key_alg), ("ecdsa-with-SHA256", "EC256"))  # our certificate's
        layer.loseConnection()
        await inner.lost
        self.assertFalse(failed.called)

    async def failure(self, issued: Issued, upstream: UpstreamTLSConfig, server_name: str = "db.example") -> str:
        """The reason a client-side layer gives up on a target with C{issued}; its inner never connected."""
        port, served = self.target(issued, echo_until_close_notify)
        inner = Inner()
        layer, failed = await self.connect(port, upstream, inner, server_name)
        reason = await failed
        await served
        await until(lambda: not layer.transport.connected)  # type: ignore[attr-defined]
        self.assertEqual(inner.events, [])
        self.assertIsNone(layer.facts)
        return reason

    async def test_a_certificate_for_another_name(self) -> None:
        issued = self.ca.server("other.example", "192.0.2.7")
        reason = await self.failure(issued, UpstreamTLSConfig(ca=str(self.ca.cert)))
        self.assertEqual(reason, "certificate names other.example, 192.0.2.7, not db.example")

    async def test_an_ip_literal_is_verified_as_an_address_and_sent_no_sni(self) -> None:
        names: list[str | None] = []

        def configure(context: ssl.SSLContext) -> None:
            context.sni_callback = lambda tls, name, context: names.append(name)  # type: ignore[assignment,misc]

        port, served = self.target(self.ca.server("db.example", "127.0.0.1"), echo_until_close_notify, configure)
        inner = Inner(reply=b"")
        layer, failed = await self.connect(port, UpstreamTLSConfig(ca=str(self.ca.cert)), inner, "127.0.0.1")
        await until(lambda: inner.events)
        facts = layer.facts
        assert facts is not None
        self.assertIsNone(facts.server_name)
        layer.loseWriteConnection()
        await served
        await inner.lost
        self.assertEqual(names, [None])
        wrong = await self.failure(self.ca.server("db.example", "127.0.0.1"),
                                   UpstreamTLSConfig(ca=str(self.ca.cert)), "127.0.0.2")
        self.assertEqual(wrong, "certificate names db.example, 127.0.0.1, not 127.0.0.2")

    async def test_an_unknown_ca(self) -> None:
        reason = await self.failure(self.other_ca.server("db.example"), UpstreamTLSConfig(ca=str(self.ca.cert)))
        self.assertEqual(reason, "certificate verify failed: unknown ca")

    async def test_verify_false_takes_any_certificate(self) -> None:
        port, served = self.target(self.other_ca.server("other.example"), echo_until_close_notify)
        inner = Inner(reply=b"")
        layer, failed = await self.connect(port, UpstreamTLSConfig(verify=False), inner)
        await until(lambda: inner.events)
        facts = layer.facts
        assert facts is not None
        self.assertEqual((facts.client_cert, facts.client_verified, facts.client_cn), (True, False, None))
        layer.loseWriteConnection()
        await served
        await inner.lost

    async def test_the_system_store(self) -> None:
        """Without a C{ca}, OpenSSL's default store (here: SSL_CERT_FILE, as OpenSSL reads it)."""
        saved = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = str(self.ca.cert)
        try:
            upstream = UpstreamTLSConfig()
            port, served = self.target(self.ca.server("db.example"), echo_until_close_notify)
            inner = Inner(reply=b"")
            layer, failed = await self.connect(port, upstream, inner)
        finally:
            if saved is None:
                del os.environ["SSL_CERT_FILE"]
            else:
                os.environ["SSL_CERT_FILE"] = saved
        await until(lambda: inner.events)
        layer.loseWriteConnection()
        await served
        await inner.lost
        self.assertFalse(failed.called)

    async def test_half_close_towards_the_target(self) -> None:
        """Our close_notify and FIN end our direction only: the target's answer still arrives."""

        def answer_after_close_notify(tls: ssl.SSLSocket) -> bytes:
            request = b""
            while data := tls.recv(CHUNK):
                request += data
            tls.sendall(b"answer to " + request)
            tls.unwrap()
            return request

        port, served = self.target(self.ca.server("db.example"), answer_after_close_notify)
        inner = Inner()
        layer, failed = await self.connect(port, UpstreamTLSConfig(ca=str(self.ca.cert)), inner)
        await until(lambda: inner.events)
        layer.write(b"request")
        layer.loseWriteConnection()
        await inner.eof
        self.assertEqual(inner.data, b"answer to request")
        self.assertEqual(await served, b"request")
        await inner.lost
        self.assertEqual(inner.events, ["connected", "write closed", "eof", "lost"])


# -- without sockets


class Transport(StringTransport):
    """What a layer needs of a TCP transport, in memory."""

    def abortConnection(self) -> None:
        self.loseConnection()


def test_a_failure_nobody_waits_for_is_not_logged(tls_ca: TestCA) -> None:
    """A pair that refuses a client at accept never waits for its handshake: no "Unhandled error in Deferred"."""
    errors: list[dict[str, Any]] = []
    observer = lambda event: errors.append(event) if event.get("isError") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        layer = TLSLayer(Protocol(), server_context(server_tls(tls_ca.server("db.example"))), server=True,
                         reactor=Clock(), handshake_timeout=0)
        layer.makeConnection(Transport())
        layer.abortConnection()
        layer.connectionLost(Failure(ConnectionDone()))
        assert layer.failure == "closed during handshake"
        del layer
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert errors == []


def test_a_failure_reaches_whoever_waits(tls_ca: TestCA) -> None:
    context = server_context(server_tls(tls_ca.server("db.example")))
    layer = TLSLayer(Protocol(), context, server=True, reactor=Clock(), handshake_timeout=0)
    layer.makeConnection(Transport())
    outcomes: list[Any] = []
    layer.handshake.addErrback(lambda failure: outcomes.append(failure.value))
    layer.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert [str(e) for e in outcomes] == ["not TLS (an HTTP request)"]
    assert isinstance(outcomes[0], TLSHandshakeError)
    reasons: list[str] = []
    layer = TLSLayer(Protocol(), context, server=True, reactor=Clock(), handshake_timeout=0, on_failure=reasons.append)
    layer.makeConnection(Transport())
    layer.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert reasons == ["not TLS (an HTTP request)"]
    assert not layer.handshake.called  # on_failure takes the failure instead
