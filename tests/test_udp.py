"""
The UDP relay end to end: a real C{twistd -n streamrelay} process between
blocking loopback sockets and an echo target in a thread, plus the UDP
fields' validation.
"""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from streamrelay.config import ConfigError, parse_config
from streamrelay.compat import SessionPort
from streamrelay.udp import MAX_DATAGRAM
from tests.harness import DEADLINE, Relay, poll, run_twistd, write_config


class UDPEcho:
    """
    A UDP echo target: a thread with a blocking socket that sends every
    datagram back to its sender and records C{(sender, datagram)}.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind((host, port))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[tuple[tuple, bytes]] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                data, sender = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.received.append((sender[:2], data))
            self.answer(data, sender)

    def answer(self, data: bytes, sender: tuple) -> None:
        """Echo C{data}; subclasses answer otherwise."""
        self.sock.sendto(data, sender)

    def close(self) -> None:
        self.running = False
        self.thread.join(DEADLINE)
        self.sock.close()

    def __enter__(self) -> UDPEcho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def udp_route(name: str, target_port: int, scheme: str = "udp4", bind: str | None = "127.0.0.1",
              host: str = "127.0.0.1", **fields: object) -> str:
    lines = [f"scheme: {scheme}", f"host: '{host}'", f"port: ':{target_port}'"]
    if bind is not None:
        lines.append(f"bind: '{bind}'")
    lines += [f"{key}: {value}" for key, value in fields.items()]
    return f"  {name}:\n" + "".join(f"    {line}\n" for line in lines)


def start(directory: Path, routes: str, level: str = "debug") -> Relay:
    return Relay(write_config(directory, "routes:\n" + routes), "--log-level", level)


def client(port: int, host: str = "127.0.0.1", connected: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.bind((host, 0))
    if connected:
        sock.connect((host, port))
    return sock


def bound_client(source: str, port: int) -> socket.socket:
    """A client socket on the loopback address C{source}, connected to the relay."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def echoes(sock: socket.socket, payload: bytes) -> bool:
    sock.send(payload)
    return sock.recv(65535) == payload


def no_reply(sock: socket.socket, wait: float = 0.5) -> bool:
    sock.settimeout(wait)
    try:
        sock.recv(65535)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


def descriptors_without(relay: Relay, sessions: int) -> int:
    """
    The relay's descriptor count less its C{sessions} open sessions.  Only
    meaningful once a datagram has gone through: twistd opens its signal
    pipes after the routes have bound.
    """
    return relay.fd_count() - sessions


def clean(relay: Relay) -> bool:
    """Nothing went wrong in the relay that it did not log as an event."""
    text = "".join(relay.lines) + relay.stderr()
    return "Traceback" not in text and "Unhandled" not in text


@pytest.fixture(scope="module")
def targets():
    with UDPEcho() as v4, UDPEcho("::1") as v6:
        yield v4, v6


@pytest.fixture(scope="module")
def relay(tmp_path_factory, targets):
    v4, v6 = targets
    routes = (
        udp_route("echo", v4.port)
        + udp_route("echo6", v6.port, scheme="udp6", bind="::1", host="::1")
        + udp_route("dual", v4.port, scheme="udp", bind=None)
        + udp_route("named", v4.port, host="localhost")
    )
    with start(tmp_path_factory.mktemp("udp"), routes) as relay:
        yield relay


def test_1000_clients_each_get_their_own_datagrams(tmp_path) -> None:
    with UDPEcho() as target, start(tmp_path, udp_route("echo", target.port), "info") as relay:
        clients = [client(relay.ports["echo"]) for _ in range(1000)]
        try:
            assert echoes(clients[0], b"client 0")
            baseline = descriptors_without(relay, 1)
            for wave in range(1, 1000, 111):  # waves keep the relay's receive buffer from overflowing
                batch = clients[wave : wave + 111]
                for i, sock in enumerate(batch, wave):
                    sock.send(b"client %d" % i)
                for i, sock in enumerate(batch, wave):
                    assert sock.recv(65535) == b"client %d" % i
            for i, sock in enumerate(clients):  # a second round goes through the same sessions
                sock.send(b"again %d" % i)
                assert sock.recv(65535) == b"again %d" % i
            assert len({sender for sender, _ in target.received}) == 1000
            assert relay.fd_count() == baseline + 1000
            assert relay.stop() == -signal.SIGTERM
        finally:
            for sock in clients:
                sock.close()
        closed = relay.actions("session-closed", reason="shutdown")
        assert len(closed) == 1000
        assert all(e["datagrams_up"] == e["datagrams_down"] == 2 and e["dropped"] == 0 for e in closed)
        assert relay.actions("stop")[0]["sessions"] == 1000
        assert clean(relay)


@pytest.mark.parametrize(
    "route, host, sizes",
    [
        ("echo", "127.0.0.1", [1, 1400, 8192, 16385, 65507]),
        ("echo6", "::1", [1, 1400, 8192, 16385, 65527]),
    ],
)
def test_datagrams_arrive_whole_both_ways(relay: Relay, targets, route: str, host: str, sizes: list[int]) -> None:
    target = targets[0] if route == "echo" else targets[1]
    with client(relay.ports[route], host) as sock:
        payloads = [bytes(i % 251 for i in range(size)) for size in sizes]
        before = len(target.received)
        for payload in payloads:
            assert echoes(sock, payload)
        assert [data for _, data in target.received[before:]] == payloads


def test_replies_come_from_the_listening_address(relay: Relay) -> None:
    port = relay.ports["echo"]
    with client(port, connected=False) as sock:
        sock.sendto(b"where from?", ("127.0.0.1", port))
        assert sock.recvfrom(100) == (b"where from?", ("127.0.0.1", port))


def test_dual_stack_route_answers_both_families(relay: Relay) -> None:
    port = relay.ports["dual"]
    with client(port) as v4, client(port, "::1", connected=False) as v6:
        assert echoes(v4, b"over IPv4")
        v6.sendto(b"over IPv6", ("::1", port))
        data, sender = v6.recvfrom(100)
        assert (data, sender[:2]) == (b"over IPv6", ("::1", port))
        clients = {e["client"] for e in relay.wait_for("session-open", count=2, route="dual")}
        assert f"[::ffff:127.0.0.1]:{v4.getsockname()[1]}" in clients


def test_datagrams_sent_while_the_name_resolves_are_held(relay: Relay) -> None:
    with client(relay.ports["named"]) as sock:
        for i in range(5):
            sock.send(b"early %d" % i)
        assert sorted(sock.recv(100) for _ in range(5)) == [b"early %d" % i for i in range(5)]
    opened = relay.wait_for("session-open", route="named")[0]
    assert opened["dst"].startswith("localhost:") and opened["via"].startswith("127.0.0.1:")


def test_idle_sessions_expire_and_their_sockets_close(tmp_path) -> None:
    with UDPEcho() as target:
        route = udp_route("echo", target.port, udp_idle_timeout="500ms", udp_cleanup_interval="100ms")
        with start(tmp_path, route) as relay, client(relay.ports["echo"]) as sock:
            assert echoes(sock, b"busy")
            baseline = descriptors_without(relay, 1)
            for _ in range(7):  # traffic every 150ms keeps the session alive
                time.sleep(0.15)
                assert echoes(sock, b"busy")
            last = time.monotonic()
            assert relay.fd_count() == baseline + 1
            closed = relay.wait_for("session-closed", timeout=5)[0]
            assert 0.5 <= time.monotonic() - last < 0.5 + 2 * 0.1 + 1  # timeout + 2 sweeps + slack
            assert closed["reason"] == "idle"
            assert (closed["datagrams_up"], closed["bytes_down"], closed["dropped"]) == (8, 32, 0)
            poll(lambda: relay.fd_count() == baseline)
            assert len(relay.actions("session-open")) == 1
            assert echoes(sock, b"back again")
            assert len(relay.wait_for("session-open", count=2)) == 2
            assert relay.fd_count() == baseline + 1


def test_session_limit_drops_new_sources_only(tmp_path) -> None:
    with UDPEcho() as target:
        with start(tmp_path, udp_route("echo", target.port, max_udp_sessions=10)) as relay:
            port = relay.ports["echo"]
            first = [client(port) for _ in range(10)]
            extra = client(port)
            try:
                for i, sock in enumerate(first):
                    assert echoes(sock, b"%d" % i)
                for _ in range(20):
                    extra.send(b"let me in")
                assert no_reply(extra)
                for i, sock in enumerate(first):
                    assert echoes(sock, b"still %d" % i)
                refused = relay.wait_for("limited", reason="max_udp_sessions reached")
                assert len(refused) == 1  # logged at most once a second
                assert refused[0]["client"] == "127.0.0.1:%d" % extra.getsockname()[1]
                assert relay.stop() == -signal.SIGTERM
                assert relay.actions("stop")[0]["refused"] == 20
                assert len(relay.actions("session-closed", reason="shutdown")) == 10
            finally:
                for sock in [*first, extra]:
                    sock.close()


def test_unreachable_target_ends_only_its_session(tmp_path) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()  # nothing listens there: the kernel answers port unreachable
    with UDPEcho() as target:
        routes = udp_route("down", dead_port) + udp_route("echo", target.port)
        with start(tmp_path, routes) as relay, client(relay.ports["down"]) as lost, \
                client(relay.ports["echo"]) as fine:
            assert echoes(fine, b"before")
            baseline = descriptors_without(relay, 1)
            for i in range(3):
                lost.send(b"anyone?")
                relay.wait_for("session-closed", count=i + 1, route="down")
                assert echoes(fine, b"during %d" % i)
            closed = relay.actions("session-closed", route="down")
            assert {e["reason"] for e in closed} == {"target unreachable"}
            assert len(relay.actions("session-open", route="down")) == 3
            with UDPEcho(port=dead_port):  # the target comes back: the next datagram gets through
                assert echoes(lost, b"hello again")
            assert echoes(fine, b"after")
            assert relay.fd_count() == baseline + 2  # the live session of each route
            assert relay.stop() == -signal.SIGTERM
            assert relay.actions("stop", route="down")[0]["unreachable"] == 3
            assert clean(relay)


def test_bind_failure_names_route_and_address(tmp_path) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        path = write_config(tmp_path, f"routes:\n  dns: {{scheme: udp4, bind: 127.0.0.1, port: '{port}:53'}}\n")
        result = run_twistd(path)
    finally:
        busy.close()
    assert result.returncode != 0
    assert f"route 'dns': cannot listen on udp 127.0.0.1:{port}" in result.stdout + result.stderr


def test_udp_fields_and_defaults() -> None:
    config = parse_config(
        "defaults: {udp_idle_timeout: 30s, connect_timeout: 1s, max_udp_sessions: 100}\n"
        "routes:\n"
        "  dns: {scheme: udp, port: ':53', udp_cleanup_interval: 5s}\n"
        "  game: {scheme: udp6, port: ':27015', max_udp_sessions: 2}\n"
        "  plain: {scheme: udp4, port: ':514'}\n"
        "  ssh: {scheme: tcp, port: ':22'}\n"
    )
    dns, game, plain, ssh = config.routes
    assert (dns.udp_idle_timeout, dns.udp_cleanup_interval, dns.max_udp_sessions) == (30, 5, 100)
    assert (game.bind, game.max_udp_sessions) == ("::", 2)
    assert plain.bind == "0.0.0.0" and dns.bind == "::"
    assert ssh.connect_timeout == 1 and dns.connect_timeout == 5.0  # TCP-only: not applied to UDP
    assert (ssh.udp_idle_timeout, ssh.max_udp_sessions) == (300, 4096)  # and the reverse
    assert (plain.udp_idle_timeout, plain.udp_cleanup_interval) == (30, 60)


def one_route(body: str) -> str:
    return "routes:\n  r: {" + body + "}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (one_route("scheme: tcp, port: ':1', udp_idle_timeout: 5s"),
         "route 'r': field 'udp_idle_timeout': only supported for udp routes, not tcp"),
        (one_route("scheme: tcp4, port: ':1', max_udp_sessions: 10"),
         "route 'r': field 'max_udp_sessions': only supported for udp routes, not tcp4"),
        (one_route("scheme: tcp6, port: ':1', udp_cleanup_interval: 1s"),
         "route 'r': field 'udp_cleanup_interval': only supported for udp routes, not tcp6"),
        (one_route("scheme: udp4, port: ':1', relay_proxy_protocol_header: true"),
         "route 'r': field 'relay_proxy_protocol_header': only supported for tcp routes, not udp4"),
        (one_route("scheme: udp6, port: ':1', backlog: 10"),
         "route 'r': field 'backlog': only supported for tcp routes, not udp6"),
        (one_route("scheme: udp, port: ':1', half_close_timeout: 1s"),
         "route 'r': field 'half_close_timeout': only supported for tcp routes, not udp"),
        (one_route("scheme: udp, port: ':1', max_udp_sessions: 0"),
         "route 'r': field 'max_udp_sessions': expected an integer from 1 to 1048576, found 0"),
        (one_route("scheme: udp, port: ':1', udp_idle_timeout: 0"),
         "route 'r': field 'udp_idle_timeout': expected a duration above 0"),
        (one_route("scheme: udp, port: ':1', udp_cleanup_interval: often"),
         "route 'r': field 'udp_cleanup_interval': expected a duration such as"),
        ("defaults: {udp_cleanup_interval: 0s}\n" + one_route("scheme: udp, port: ':1'"),
         "field 'defaults.udp_cleanup_interval': expected a duration above 0"),
        (one_route("scheme: udp4, port: ':1', bind: '::'"),
         "route 'r': field 'bind': expected an IPv4 address for scheme udp4"),
    ],
)
def test_fields_on_the_wrong_scheme_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "routes.yml")
    assert message in str(caught.value)


def test_acl_denies_sources_before_they_get_a_session(tmp_path) -> None:
    with UDPEcho() as target:
        acl = '{default: deny, allow_local: false, allow: ["ip:127.0.0.2"]}'
        with start(tmp_path, udp_route("echo", target.port, acl=acl)) as relay:
            sockets = {source: bound_client(source, relay.ports["echo"]) for source in ("127.0.0.2", "127.0.0.3")}
            try:
                for _ in range(5):
                    sockets["127.0.0.3"].send(b"denied")
                assert echoes(sockets["127.0.0.2"], b"allowed")
                assert no_reply(sockets["127.0.0.3"])
                denied = relay.wait_for("denied")
                assert denied[0]["client"].startswith("127.0.0.3:") and denied[0]["rule"] == "default deny"
                assert len(relay.actions("session-open")) == 1
                assert relay.stop() == -signal.SIGTERM
                assert relay.actions("stop")[0]["denied"] == 5
            finally:
                for sock in sockets.values():
                    sock.close()


def test_a_flood_of_one_refusal_kind_hides_no_other(tmp_path) -> None:
    """ACL denials and session-limit refusals are logged and counted each on their own."""
    with UDPEcho() as target:
        acl = '{default: deny, allow_local: false, allow: ["ip:127.0.0.2"]}'
        with start(tmp_path, udp_route("echo", target.port, acl=acl, max_udp_sessions=1)) as relay:
            port = relay.ports["echo"]
            inside, extra, stranger = (bound_client("127.0.0.2", port), bound_client("127.0.0.2", port),
                                       bound_client("127.0.0.3", port))
            try:
                assert echoes(inside, b"the only session")
                for _ in range(20):
                    stranger.send(b"denied")
                for _ in range(5):
                    extra.send(b"limited")
                assert no_reply(extra)
                denied, limited = relay.wait_for("denied"), relay.wait_for("limited")
                assert (len(denied), len(limited)) == (1, 1)  # neither hid the other
                assert denied[0]["client"] == "127.0.0.3:%d" % stranger.getsockname()[1]
                assert limited[0]["client"] == "127.0.0.2:%d" % extra.getsockname()[1]
                assert denied[0]["suppressed"] == limited[0]["suppressed"] == 0
                assert relay.stop() == -signal.SIGTERM
                stop = relay.actions("stop")[0]
                assert (stop["denied"], stop["refused"], stop["sessions"]) == (20, 5, 1)
            finally:
                for sock in (inside, extra, stranger):
                    sock.close()


class SessionPortTests(TestCase):
    """The session's socket alone, in-process, on real loopback sockets."""

    def test_datagrams_from_strangers_before_the_connect_are_dropped(self) -> None:
        received: list[bytes] = []
        protocol = DatagramProtocol()
        protocol.datagramReceived = lambda data, addr: received.append(data)  # type: ignore[method-assign]
        port = SessionPort(0, protocol, "127.0.0.1", MAX_DATAGRAM, reactor)
        port.startListening()
        self.addCleanup(port.stopListening)
        stranger, target = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
        for sock in (stranger, target):
            self.addCleanup(sock.close)
            sock.bind(("127.0.0.1", 0))
        address = ("127.0.0.1", port.getHost().port)
        for i in range(3):
            stranger.sendto(b"spoofed %d" % i, address)
        readable(port.getHandle())
        port.connect(*target.getsockname())
        self.assertEqual(port.discard_strangers(), 3)
        target.sendto(b"reply", address)
        readable(port.getHandle())
        port.doRead()  # what the reactor calls once the socket is readable
        self.assertEqual(received, [b"reply"])


def readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], DEADLINE)[0], "nothing arrived"
