"""
The TCP relay end to end: a real C{twistd -n streamrelay} process between
blocking loopback sockets and an asyncio target.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from tests import harness
from tests.harness import (
    Relay,
    Target,
    connect,
    poll,
    recv_all,
    recv_exactly,
    write_config,
)


pytestmark = pytest.mark.usefixtures("relay_paths")


def tcp_route(target_port: int, name: str = "echo", **fields: object) -> str:
    return harness.tcp_route(target_port, name, **fields)


@pytest.fixture(scope="module")
def echo_target():
    with Target() as target:
        yield target


@pytest.fixture(scope="module")
def echo_relay(tmp_path_factory, echo_target, relay_paths):
    path = write_config(tmp_path_factory.mktemp("echo"), "routes:\n" + tcp_route(echo_target.port))
    with Relay(path) as relay:
        yield relay


def test_echo(echo_relay: Relay) -> None:
    with connect(echo_relay.ports["echo"]) as sock:
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
    closed = echo_relay.wait_for("closed")[-1]
    assert closed["route"] == "echo" and closed["protocol"] == "tcp"
    assert closed["bytes_up"] == 5 and closed["bytes_down"] == 5
    assert closed["client"].startswith("127.0.0.1:") and closed["duration"] >= 0


def test_64_mib_both_ways_at_once(echo_relay: Relay) -> None:
    payload = os.urandom(1 << 20) * 64
    with connect(echo_relay.ports["echo"]) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        received = recv_all(sock)
        sender.join()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the whole request, then stream a long reply and close."""
    request = await reader.read()
    for i in range(256):
        writer.write(hashlib.sha256(request + bytes([i])).digest() * 2048)
        await writer.drain()


def expected_reply(request: bytes) -> bytes:
    return b"".join(hashlib.sha256(request + bytes([i])).digest() * 2048 for i in range(256))


def test_half_close_delivers_the_whole_reply(tmp_path) -> None:
    with Target(reply_after_eof) as target:
        path = write_config(tmp_path, "routes:\n" + tcp_route(target.port))
        with Relay(path) as relay, connect(relay.ports["echo"]) as sock:
            sock.sendall(b"request")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == expected_reply(b"request")
            closed = relay.wait_for("closed")[0]
            assert closed["reason"] == "done" and closed["bytes_down"] == 256 * 2048 * 32


def test_bytes_sent_before_the_target_accepts(tmp_path) -> None:
    """The target's accept queue is full, so the relay's dial waits for a SYN retry."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    blocker = socket.create_connection(("127.0.0.1", port))
    try:
        path = write_config(tmp_path, "routes:\n" + tcp_route(port, connect_timeout="10s"))
        with Relay(path, "--log-level", "debug") as relay, connect(relay.ports["echo"]) as client:
            relay.wait_for("accept")
            chunks = [os.urandom(997) for _ in range(300)]
            for chunk in chunks:
                client.sendall(chunk)
            client.shutdown(socket.SHUT_WR)
            assert not relay.actions("connected")
            listener.accept()[0].close()  # frees the queue: the relay's retry gets in
            upstream, _ = listener.accept()
            with upstream:
                upstream.settimeout(15)
                assert recv_all(upstream) == b"".join(chunks)
    finally:
        blocker.close()
        listener.close()


def test_target_down_closes_client_within_the_dial_budget(tmp_path) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]  # bound, never listening: connections are refused
    try:
        path = write_config(tmp_path, "routes:\n" + tcp_route(port, connect_timeout="1s", retries=2))
        with Relay(path) as relay, connect(relay.ports["echo"]) as client:
            started = time.monotonic()
            assert recv_all(client) == b""
            assert time.monotonic() - started < 1 * 3 + 2
            failed = relay.wait_for("dial-failed")[0]
            assert "refused" in failed["reason"].lower()
            assert relay.wait_for("closed")[0]["reason"] == "dial failed"
    finally:
        dead.close()


def test_unanswered_dial_times_out(tmp_path) -> None:
    """A full accept queue never answers: each attempt ends at connect_timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    blockers = [socket.create_connection(("127.0.0.1", port))]
    try:
        path = write_config(tmp_path, "routes:\n" + tcp_route(port, connect_timeout="300ms", retries=1))
        with Relay(path) as relay, connect(relay.ports["echo"]) as client:
            started = time.monotonic()
            assert recv_all(client) == b""
            elapsed = time.monotonic() - started
            assert 0.6 <= elapsed < 0.6 + 2
            assert "timeout" in relay.wait_for("dial-failed")[0]["reason"].lower()
    finally:
        for sock in blockers:
            sock.close()
        listener.close()


def test_slow_reader_keeps_memory_bounded(tmp_path) -> None:
    total = 256 << 20
    chunk = os.urandom(1 << 20)
    written = [0]

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
            written[0] += len(chunk)

    with Target(firehose) as target:
        path = write_config(tmp_path, "routes:\n" + tcp_route(target.port))
        with Relay(path) as relay, connect(relay.ports["echo"]) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            baseline = relay.rss()
            client.sendall(b"go")

            def stalled() -> bool:
                before = written[0]
                time.sleep(0.3)
                return before == written[0] and before > 0

            poll(stalled)
            assert written[0] < total
            assert relay.rss() - baseline < 64 << 20
            received, digest = 0, hashlib.sha256()
            while data := client.recv(1 << 20):
                received += len(data)
                digest.update(data)
            assert received == total
            assert digest.digest() == hashlib.sha256(chunk * (total // len(chunk))).digest()


def test_500_concurrent_connections_and_no_descriptor_leak(echo_relay: Relay) -> None:
    baseline = echo_relay.fd_count()
    payloads = [os.urandom(2048) + i.to_bytes(4, "big") for i in range(500)]
    sockets = [connect(echo_relay.ports["echo"]) for _ in payloads]
    try:
        for sock, payload in zip(sockets, payloads):
            sock.sendall(payload)
        for sock, payload in zip(sockets, payloads):
            assert recv_exactly(sock, len(payload)) == payload
        assert echo_relay.fd_count() >= baseline + 1000
    finally:
        for sock in sockets:
            sock.close()
    poll(lambda: echo_relay.fd_count() <= baseline)


def test_reset_by_client_closes_the_target_side(tmp_path) -> None:
    with Target() as target:
        path = write_config(tmp_path, "routes:\n" + tcp_route(target.port))
        with Relay(path) as relay:
            client = connect(relay.ports["echo"])
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.close()  # RST
            assert relay.wait_for("closed")[0]["reason"] == "client reset"
            poll(lambda: target.open_connections == 0)


def test_idle_and_half_close_timeouts(tmp_path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    with Target(silent) as target:
        routes = tcp_route(target.port, "idle", idle_timeout="500ms") + tcp_route(
            target.port, "half", half_close_timeout="500ms"
        )
        path = write_config(tmp_path, "routes:\n" + routes)
        with Relay(path) as relay:
            baseline = relay.fd_count()
            with connect(relay.ports["idle"]) as idle, connect(relay.ports["half"]) as half:
                half.shutdown(socket.SHUT_WR)
                started = time.monotonic()
                assert recv_all(idle) == b"" and recv_all(half) == b""
                assert time.monotonic() - started < 5
            reasons = {e["route"]: e["reason"] for e in relay.wait_for("closed", count=2)}
            assert reasons == {"idle": "idle timeout", "half": "half-close timeout"}
            poll(lambda: relay.fd_count() <= baseline)


def test_sigterm_stops_promptly_and_closes_targets(tmp_path) -> None:
    with Target() as target:
        routes = tcp_route(target.port, "one") + tcp_route(target.port, "two")
        path = write_config(tmp_path, "routes:\n" + routes)
        with Relay(path) as relay:
            clients = [connect(relay.ports[name]) for name in ("one", "two", "one")]
            for client in clients:
                client.sendall(b"ping")
                assert recv_exactly(client, 4) == b"ping"
            poll(lambda: target.open_connections == 3)
            started = time.monotonic()
            assert relay.stop() == -signal.SIGTERM  # twistd re-raises the signal it stopped on
            assert time.monotonic() - started < 5
            assert {e["route"] for e in relay.actions("stop")} == {"one", "two"}
            assert len(relay.actions("closed", reason="shutdown")) == 3
            for client in clients:
                assert recv_all(client) == b""
                client.close()
            poll(lambda: target.open_connections == 0)


def _stall(sock: socket.socket) -> int:
    """Send from C{sock} until the far end has stopped taking bytes; how many went."""
    sock.setblocking(False)
    chunk, sent, stalled_since = b"\0" * 65536, 0, None
    deadline = time.monotonic() + harness.DEADLINE
    while time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:  # nothing drained for half a second
                return sent
            time.sleep(0.01)
    raise AssertionError("the relay never stopped taking bytes")


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_a_paused_client_that_resets_is_seen_and_the_stalled_target_cut_off(tmp_path) -> None:
    """
    A target that stops reading pauses the client's side; the client's reset
    must still be noticed (defect: it went unseen while paused), and the
    target, which never drains what is buffered for it, is reset after
    C{close_timeout} (defect: with no idle timeout the pair lived forever).
    """
    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    with Target(never_reads) as target:
        path = write_config(tmp_path, "routes:\n" + tcp_route(target.port, close_timeout="1s"))
        with Relay(path) as relay:
            baseline = relay.fd_count()
            client = connect(relay.ports["echo"])
            assert _stall(client) > 0
            started = time.monotonic()
            _reset(client)
            closed = relay.wait_for("closed")[0]
            assert closed["reason"] == "client reset"
            assert time.monotonic() - started < harness.DEADLINE / 2
            poll(lambda: relay.fd_count() <= baseline)


def test_a_paused_target_that_resets_is_seen_and_the_stalled_client_cut_off(tmp_path) -> None:
    """
    The same the other way: the client stops reading, the target floods,
    then resets.  (That the survivor is reset at C{close_timeout} when it
    never drains is checked in memory, in test_pair.py: how much the kernel
    takes off the relay's hands before that differs between the paths.)
    """
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        path = write_config(tmp_path, "routes:\n" + tcp_route(server.getsockname()[1], close_timeout="1s"))
        with Relay(path) as relay:
            baseline = relay.fd_count()
            client = connect(relay.ports["echo"])
            upstream, _ = server.accept()
            assert _stall(upstream) > 0
            _reset(upstream)
            closed = relay.wait_for("closed")[0]
            assert closed["reason"] == "target reset"
            try:  # what the kernel took is delivered; what the relay held, dropped at the deadline
                recv_all(client)
            except ConnectionResetError:
                pass  # the client's socket ends either way, instead of waiting forever
            poll(lambda: relay.fd_count() <= baseline)
            client.close()
