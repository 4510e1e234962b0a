"""
The zero-copy path end to end: what only a spliced pair can get wrong (pipes,
their descriptors, their backpressure, the switch from Twisted), checked on
pairs whose C{spliced} event proves they took it.  The relay tests of
test_tcp, test_proxy_protocol and test_access also run spliced.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from streamrelay import Hooks, parse_config
from streamrelay.config import ConfigError
from streamrelay.events import RefusalLog, RouteEvents
from streamrelay import splice
from streamrelay.splice import PipePool, Splice
from streamrelay.tcp import RelayFactory
from tests.harness import tcp_route, Relay, Target, connect, poll, recv_all, recv_exactly, write_config

pytestmark = pytest.mark.skipif(not hasattr(os, "splice"), reason="os.splice needs Linux and Python 3.10+")

MIB = 1 << 20


def route(target_port: int, name: str = "s", splice: str = "true", **fields: object) -> str:
    return tcp_route(target_port, name, splice=splice, **fields)


def debug_relay(directory: Path, routes: str, *args: str) -> Relay:
    return Relay(write_config(directory, "routes:\n" + routes), "--log-level", "debug", *args)


def test_64_mib_each_way_with_exact_counters(tmp_path: Path) -> None:
    up, down = os.urandom(MIB) * 64, os.urandom(MIB) * 48
    received_up: list[str] = []

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            for i in range(0, len(down), MIB):
                writer.write(down[i : i + MIB])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.ensure_future(send())
        digest = hashlib.sha256()
        while data := await reader.read(MIB):
            digest.update(data)
        await sending
        received_up.append(digest.hexdigest())

    with Target(exchange) as target, debug_relay(tmp_path, route(target.port)) as relay:
        with connect(relay.ports["s"]) as sock:
            sender = threading.Thread(target=lambda: (sock.sendall(up), sock.shutdown(socket.SHUT_WR)))
            sender.start()
            got = recv_all(sock)
            sender.join()
        assert hashlib.sha256(got).digest() == hashlib.sha256(down).digest()
        poll(lambda: received_up)
        assert received_up == [hashlib.sha256(up).hexdigest()]
        closed = relay.wait_for("closed")[0]
        assert (closed["reason"], closed["bytes_up"], closed["bytes_down"]) == ("done", len(up), len(down))
        assert relay.actions("spliced", conn=closed["conn"])


def test_half_close_each_way(tmp_path: Path) -> None:
    """The client's FIN first (request, then reply), and the target's first (banner, then upload)."""
    uploads: list[bytes] = []

    async def banner_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()
        uploads.append(await reader.read())

    async def read_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        writer.write(request[::-1] * 50_000)

    with Target(read_then_reply) as replier, Target(banner_then_read) as greeter:
        routes = route(replier.port, "reply") + route(greeter.port, "banner")
        with debug_relay(tmp_path, routes) as relay:
            with connect(relay.ports["reply"]) as sock:
                sock.sendall(b"request")
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b"tseuqer" * 50_000
            with connect(relay.ports["banner"]) as sock:
                assert recv_all(sock) == b"banner"  # the target's FIN came through
                relay.wait_for("spliced", route="banner")
                sock.sendall(b"x" * MIB)  # our half is still open
                sock.shutdown(socket.SHUT_WR)
                poll(lambda: uploads)
            assert uploads == [b"x" * MIB]
            closed = {e["route"]: e for e in relay.wait_for("closed", count=2)}
            assert [closed[name]["reason"] for name in ("reply", "banner")] == ["done", "done"]
            assert closed["reply"]["bytes_down"] == 7 * 50_000 and closed["banner"]["bytes_up"] == MIB
            assert len(relay.actions("spliced")) == 2


def test_slow_reader_stalls_the_target_and_rss_stays_flat(tmp_path: Path) -> None:
    total, chunk, written = 128 * MIB, os.urandom(MIB), [0]

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(total // MIB):
            writer.write(chunk)
            await writer.drain()
            written[0] += MIB

    with Target(firehose) as target, debug_relay(tmp_path, route(target.port)) as relay:
        with connect(relay.ports["s"]) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            baseline = relay.rss()
            client.sendall(b"go")
            relay.wait_for("spliced")

            def stalled() -> bool:
                before = written[0]
                time.sleep(0.3)
                return before == written[0] and before > 0

            poll(stalled)
            assert written[0] < 32 * MIB  # socket buffers and two pipes, not the whole stream
            assert relay.rss() - baseline < 8 * MIB  # the bytes never enter the process
            digest = hashlib.sha256()
            while data := client.recv(MIB):
                digest.update(data)
            assert digest.digest() == hashlib.sha256(chunk * (total // MIB)).digest()


def test_200_spliced_pairs_then_no_descriptor_left(tmp_path: Path) -> None:
    with Target() as target, debug_relay(tmp_path, route(target.port, max_connections_per_client=200)) as relay:
        baseline = relay.fd_count()
        sockets = [connect(relay.ports["s"]) for _ in range(200)]
        try:
            for i, sock in enumerate(sockets):
                sock.sendall(i.to_bytes(4, "big") * 100)
            for i, sock in enumerate(sockets):
                assert recv_exactly(sock, 400) == i.to_bytes(4, "big") * 100
            relay.wait_for("spliced", count=200)
            # two sockets per idle pair: a pipe is held only while bytes are in it
            assert baseline + 200 * 2 <= relay.fd_count() <= baseline + 200 * 2 + 4
        finally:
            for sock in sockets[:100]:
                sock.shutdown(socket.SHUT_WR)  # a clean end: FIN both ways
                assert recv_all(sock) == b""
                sock.close()
            for sock in sockets[100:]:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                sock.close()  # a reset
        closed = relay.wait_for("closed", count=200)
        assert sorted(e["reason"] for e in closed) == ["client reset"] * 100 + ["done"] * 100
        assert all(e["bytes_up"] == e["bytes_down"] == 400 for e in closed)
        poll(lambda: relay.fd_count() <= baseline)
        # every pair left the per-client count: 200 more are admitted
        more = [connect(relay.ports["s"]) for _ in range(200)]
        for sock in more:
            sock.sendall(b"!")
        assert all(recv_exactly(sock, 1) == b"!" for sock in more)
        for sock in more:
            sock.close()
        assert not relay.actions("limited")


def test_traffic_keeps_a_spliced_pair_from_the_idle_timeout(tmp_path: Path) -> None:
    with Target() as target, debug_relay(tmp_path, route(target.port, idle_timeout="400ms")) as relay:
        with connect(relay.ports["s"]) as sock:
            for _ in range(8):  # 1.6 s of traffic, never 400 ms apart
                time.sleep(0.2)
                sock.sendall(b"tick")
                assert recv_exactly(sock, 4) == b"tick"
            last = time.monotonic()
            assert recv_all(sock) == b""
            assert 0.35 < time.monotonic() - last < 2
        closed = relay.wait_for("closed")[0]
        assert (closed["reason"], closed["bytes_up"], closed["bytes_down"]) == ("idle timeout", 32, 32)
        assert relay.actions("spliced")


def test_target_reset_closes_the_client(tmp_path: Path) -> None:
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
        )
        writer.transport.abort()

    with Target(reset_after_hello) as target, debug_relay(tmp_path, route(target.port)) as relay:
        with connect(relay.ports["s"]) as sock:
            relay.wait_for("spliced")
            sock.sendall(b"hello")
            assert recv_all(sock) == b""
        closed = relay.wait_for("closed")[0]
        assert (closed["reason"], closed["bytes_up"]) == ("target reset", 5)


def test_urgent_data_neither_stalls_nor_spins(tmp_path: Path) -> None:
    """splice(2) stops at TCP urgent data: the urgent byte is dropped, as on the default path."""

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{relay.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    with Target() as target, debug_relay(tmp_path, route(target.port)) as relay:
        with connect(relay.ports["s"]) as sock:
            sock.sendall(b"ab")
            assert recv_exactly(sock, 2) == b"ab"
            relay.wait_for("spliced")
            sock.send(b"!", socket.MSG_OOB)
            sock.sendall(b"cd")
            assert recv_exactly(sock, 2) == b"cd"
            before = cpu_seconds()
            time.sleep(0.5)
            assert cpu_seconds() - before < 0.2
            sock.sendall(b"ef")
            assert recv_exactly(sock, 2) == b"ef"


def test_bytes_held_during_the_dial_go_first_then_splice(tmp_path: Path) -> None:
    """The target's accept queue is full: what the client sends meanwhile is held, sent, then spliced."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    blocker = socket.create_connection(listener.getsockname())
    try:
        text = route(listener.getsockname()[1], connect_timeout="10s", relay_proxy_protocol_header="true")
        with debug_relay(tmp_path, text) as relay, connect(relay.ports["s"]) as client:
            relay.wait_for("accept")
            held = os.urandom(300_000)  # beyond the hold limit: the client is paused meanwhile
            sending = threading.Thread(target=client.sendall, args=(held,))
            sending.start()
            time.sleep(0.3)
            listener.accept()[0].close()  # frees the queue: the relay's retry gets in
            upstream, _ = listener.accept()
            with upstream:
                upstream.settimeout(15)
                header = recv_exactly(upstream, 28)  # PROXY v2, TCP4
                assert header.startswith(b"\r\n\r\n\0\r\nQUIT\n")
                assert recv_exactly(upstream, len(held)) == held
                sending.join()
                relay.wait_for("spliced")
                client.sendall(b"after")
                assert recv_exactly(upstream, 5) == b"after"
                upstream.sendall(b"reply")
                assert recv_exactly(client, 5) == b"reply"
    finally:
        blocker.close()
        listener.close()


def test_shutdown_of_a_pair_whose_client_stopped_reading(tmp_path: Path) -> None:
    """
    Closed cleanly if the pipe towards the client fits in its socket buffer
    at shutdown, else aborted at the deadline: either way at once or within it.
    """
    written = [0]

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(bytes(MIB))
            await writer.drain()
            written[0] += MIB

    def stalled() -> bool:
        before = written[0]
        time.sleep(0.3)
        return before == written[0] and before > 0

    with Target(firehose) as target:
        text = "shutdown_timeout: 500ms\nroutes:\n" + route(target.port)
        with Relay(write_config(tmp_path, text), "--log-level", "debug") as relay, connect(relay.ports["s"]) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            relay.wait_for("spliced")
            poll(stalled)
            started = time.monotonic()
            assert relay.stop() == -signal.SIGTERM
            assert time.monotonic() - started < 3
            closed = relay.actions("closed")[0]
            assert closed["reason"] == "shutdown" and closed["bytes_down"] < written[0]
            received = 0
            try:
                while data := client.recv(MIB):
                    received += len(data)
            except ConnectionResetError:
                assert relay.actions("abort", reason="shutdown timeout")
            else:
                assert received == closed["bytes_down"]  # everything the relay read, then its FIN
            poll(lambda: target.open_connections == 0)


# -- the engine alone, in-process


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """An accepted connection for the engine to splice: records what it is told."""

    def __init__(self) -> None:
        self.eof = False
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.factory.accepted.append(self)  # type: ignore[attr-defined]

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason
        self.lost.callback(None)


async def receive(sock: socket.socket, size: int) -> bytes:
    """Up to C{size} bytes from a non-blocking socket (fewer at EOF), letting the reactor run."""
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except BlockingIOError:
            await deferLater(reactor, 0.01)
            continue
        if not chunk:
            break
        data += chunk
    return data


class EngineTests(TestCase):
    async def accept_two(self) -> list[tuple[Recorder, socket.socket]]:
        """Two accepted connections and their peers."""
        factory = Factory.forProtocol(Recorder)
        factory.accepted = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peers = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(2)]
        for peer in peers:
            peer.setblocking(False)
            self.addCleanup(peer.close)
        while len(factory.accepted) < 2:  # type: ignore[attr-defined]
            await deferLater(reactor, 0.01)
        by_port = {p.transport.getPeer().port: p for p in factory.accepted}  # type: ignore[attr-defined]
        return [(by_port[peer.getsockname()[1]], peer) for peer in peers]

    async def test_abort_resets_one_socket_and_the_other_lives_until_closed(self) -> None:
        (a, peer_a), (b, peer_b) = await self.accept_two()
        descriptors = len(os.listdir("/proc/self/fd"))
        moved: list[tuple[Protocol, int]] = []
        engine = Splice(reactor, a.transport, b.transport, lambda protocol, count: moved.append((protocol, count)))
        engine.start()
        peer_a.sendall(b"ping")
        self.assertEqual(await receive(peer_b, 4), b"ping")
        self.assertEqual(moved, [(a, 4)])

        engine.abort(b)
        await b.lost
        self.assertTrue(b.reason.check(ConnectionAborted))
        with self.assertRaises(ConnectionResetError):
            await receive(peer_b, 1)
        self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors - 1)  # four bytes took no pipe

        engine.close(a)
        await a.lost
        self.assertTrue(a.reason.check(ConnectionDone))
        self.assertEqual(await receive(peer_a, 1), b"")
        self.assertFalse(a.eof or b.eof)
        self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors - 2)

    async def test_small_reads_are_copied_streams_are_piped_and_pipes_go_back(self) -> None:
        (a, peer_a), (b, peer_b) = await self.accept_two()
        descriptors = len(os.listdir("/proc/self/fd"))
        pool = PipePool()
        engine = Splice(reactor, a.transport, b.transport, lambda protocol, count: None, pipes=pool)
        engine.start()
        up, down = engine.ends[a].outgoing, engine.ends[b].outgoing
        peer_a.sendall(b"small")
        self.assertEqual(await receive(peer_b, 5), b"small")
        self.assertEqual((up.piped, len(os.listdir("/proc/self/fd"))), (0, descriptors))

        payload = os.urandom(8 * MIB)
        sending = deferToThread(_send_blocking, peer_a, payload)
        self.assertEqual(await receive(peer_b, len(payload)), payload)
        await sending
        self.assertGreater(up.piped, len(payload) // 2)  # a stream: mostly spliced
        self.assertEqual(down.piped, 0)
        self.assertLessEqual(len(pool.spare), 1)  # no more spare pipes than spliced pairs
        self.assertIsNone(up.pipe)  # an idle flow holds none

        engine.close(a)
        engine.close(b)
        await a.lost
        await b.lost
        self.assertEqual(pool.spare, [])
        self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors - 2)

    async def test_copied_bytes_wait_for_a_slow_sink_and_stop_the_source(self) -> None:
        """With copying only, a sink that stops reading still stops the source and loses nothing."""
        self.patch(splice, "COPY_SIZE", 1 << 30)
        (a, peer_a), (b, peer_b) = await self.accept_two()
        engine = Splice(reactor, a.transport, b.transport, lambda protocol, count: None)
        engine.start()
        payload = os.urandom(16 * MIB)
        sent = [0]

        def send() -> None:
            view = memoryview(payload)
            peer_a.setblocking(True)
            while sent[0] < len(payload):
                sent[0] += peer_a.send(view[sent[0] : sent[0] + 65536])

        sending = deferToThread(send)
        stalled_at = -1
        while stalled_at != sent[0]:  # peer_b reads nothing: the sender stalls
            stalled_at = sent[0]
            await deferLater(reactor, 0.3)
        self.assertLess(stalled_at, len(payload))
        self.assertEqual(engine.ends[a].outgoing.piped, 0)
        self.assertEqual(await receive(peer_b, len(payload)), payload)
        await sending


def _send_blocking(sock: socket.socket, data: bytes) -> None:
    sock.setblocking(True)
    sock.sendall(data)


# -- the setting


def test_auto_splices_and_false_does_not(tmp_path: Path) -> None:
    with Target() as target:
        routes = route(target.port, "auto", splice="auto") + route(target.port, "never", splice="false")
        with debug_relay(tmp_path, routes) as relay:
            for name in ("auto", "never"):
                with connect(relay.ports[name]) as sock:
                    sock.sendall(b"ping")
                    assert recv_exactly(sock, 4) == b"ping"
            relay.wait_for("closed", count=2)
            assert [e["route"] for e in relay.actions("spliced")] == ["auto"]


def test_setting_values() -> None:
    text = "defaults: {splice: false}\nroutes:\n" + route(1, "a", splice="true") + route(2, "b", splice="auto")
    text += "  c:\n    scheme: tcp\n    port: 3\n  u:\n    scheme: udp\n    port: 4\n"
    routes = {r.name: r.splice for r in parse_config(text).routes}
    assert routes == {"a": True, "b": "auto", "c": False, "u": "auto"}
    for wrong in ("always", "1"):
        with pytest.raises(ConfigError, match=r"route 's': field 'splice': expected auto, true or false, found"):
            parse_config("routes:\n" + route(1, splice=wrong))
    with pytest.raises(ConfigError, match="only supported for tcp routes"):
        parse_config("routes:\n  u:\n    scheme: udp\n    port: 4\n    splice: true\n")


def test_true_needs_os_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "splice")
    with pytest.raises(ConfigError, match="this platform has no os.splice"):
        parse_config("routes:\n" + route(1, splice="true"))
    assert parse_config("routes:\n" + route(1, splice="auto")).routes[0].splice == "auto"


def test_an_on_read_hook_turns_auto_off_and_true_into_an_error() -> None:
    def factory(setting: str, hooks: Hooks) -> RelayFactory:
        config = parse_config("routes:\n" + route(1, splice=setting))
        events = RouteEvents(config.routes[0])
        return RelayFactory(config.routes[0], events, RefusalLog(events, None), None, hooks)

    counting = Hooks(on_read=lambda context, size, direction: None)
    assert factory("auto", Hooks()).splicing and not factory("auto", counting).splicing
    assert not factory("false", Hooks()).splicing
    with pytest.raises(ValueError, match="on_read"):
        factory("true", counting)
