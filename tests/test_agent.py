"""
Agent tunnels (GoDoxy's wire format) end to end: one streamrelay process
with C{agent:} and one with C{agents:} and routes through it, plus a
test-side client and a test-side agent written from the wire format with
Python's C{ssl} (TCP) and pyOpenSSL (DTLS), not from the project's code.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from streamrelay.config import ConfigError, UpstreamTLSConfig, parse_config
from streamrelay.dump import dump
from streamrelay.health import AgentProbe, CheckFailed
from streamrelay.tlscontext import client_context as tls_client_context
from tests.harness import (
    DEADLINE, HeaderTarget, Relay, Target, connect, poll, recv_all, recv_exactly, write_config,
)
from tests.test_udp import UDPEcho
from tests.tls_ca import Issued, TestCA, ecdsa_ca, other_ca  # noqa: F401  (fixtures)

ALPN = "godoxy-agent-stream/1"


def header(host: str, port: int, flags: int = 0, corrupt: bool = False) -> bytes:
    """The 275-byte request header, as GoDoxy's documentation lays it out."""
    name, digits = host.encode(), str(port).encode()
    body = (
        b"0.1.0".ljust(8, b"\0") + bytes([len(name)]) + name.ljust(255, b"\0")
        + bytes([len(digits)]) + digits.ljust(5, b"\0") + bytes([flags])
    )
    checksum = zlib.crc32(body) ^ (1 if corrupt else 0)
    return body + struct.pack(">I", checksum)


def client_context(ca: TestCA, cert: Issued | None, alpn: str = ALPN) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    context.set_alpn_protocols([alpn])
    return context


def open_tunnel(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    return context.wrap_socket(sock, server_hostname="godoxy.agent")


class FakeAgent:
    """A GoDoxy-style agent from the wire format: mutual TLS, reads the header, then echoes."""

    def __init__(self, ca: TestCA, cert: Issued) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert.cert), str(cert.key))
        context.load_verify_locations(str(ca.cert))
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols([ALPN])
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.headers: list[bytes] = []
        self.alpn: list[str | None] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.tunnel, args=(sock,), daemon=True).start()

    def tunnel(self, sock: socket.socket) -> None:
        sock.settimeout(DEADLINE)
        with self.context.wrap_socket(sock, server_side=True) as tls:
            self.alpn.append(tls.selected_alpn_protocol())
            self.headers.append(recv_exactly(tls, 275))
            while data := tls.recv(65536):
                tls.sendall(data)

    def close(self) -> None:
        self.listener.close()


@dataclass
class Setup:
    agent: Relay
    client: Relay
    agent_port: int
    echo: Target
    proxied: HeaderTarget
    denied: Target
    fake: FakeAgent
    ca: TestCA
    client_cert: Issued
    udp_echo: UDPEcho
    udp_denied: UDPEcho
    agent_cert: Issued


async def reply_after_fin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to the end, then answer: only a FIN that arrived lets it answer."""
    data = await reader.read()
    writer.write(b"after fin: %d" % len(data))
    await writer.drain()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ecdsa_ca: TestCA) -> Iterator[Setup]:  # noqa: F811
    directory = tmp_path_factory.mktemp("agent")
    agent_cert = ecdsa_ca.server("godoxy.agent", key_type="ec")  # ECDSA: what GoDoxy's agents offer
    client_cert = ecdsa_ca.client("streamrelay", key_type="rsa")
    with Target() as echo, HeaderTarget() as proxied, Target() as denied, Target(reply_after_fin) as fin, \
            UDPEcho() as udp_echo, UDPEcho() as udp_denied:
        allowed = f"127.0.0.1/32:{echo.port},{proxied.port},{fin.port},{udp_echo.port}"
        agent_path = write_config(directory, f"""
agent:
  listen: 127.0.0.1:0
  ca: {ecdsa_ca.cert}
  cert: {agent_cert.cert}
  key: {agent_cert.key}
  allow_targets: ["{allowed}"]
  header_timeout: 1s
routes: {{}}
""", "agent.yml")
        with Relay(agent_path, "--log-level", "debug", wait=False) as agent:
            started = agent.wait_for("start", route="@agent")[0]
            agent_port = int(started["listen"].rsplit(":", 1)[1])
            fake = FakeAgent(ecdsa_ca, agent_cert)
            tls = f"ca: {ecdsa_ca.cert}, cert: {client_cert.cert}, key: {client_cert.key}"
            routes = "".join(
                f"  {name}: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{port}', agent: {via}"
                f"{extra}}}\n"
                for name, port, via, extra in (
                    ("echo", echo.port, "edge", ""),
                    ("proxied", proxied.port, "edge", ", relay_proxy_protocol_header: true"),
                    ("denied", denied.port, "edge", ""),
                    ("fin", fin.port, "edge", ""),
                    ("fake", 7, "fake", ""),
                )
            ) + "".join(
                f"  {name}: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{port}', agent: {via}}}\n"
                for name, port, via in (
                    ("udp", udp_echo.port, "edge"), ("udp-denied", udp_denied.port, "edge"), ("udp-fake", 9, "fake")
                )
            )
            client_path = write_config(directory, f"""
agents:
  edge: {{address: "127.0.0.1:{agent_port}", {tls}}}
  fake: {{address: "127.0.0.1:{fake.port}", {tls}}}
routes:
{routes}""", "client.yml")
            with Relay(client_path) as client:
                yield Setup(
                    agent, client, agent_port, echo, proxied, denied, fake, ecdsa_ca, client_cert, udp_echo, udp_denied,
                    agent_cert,
                )
            fake.close()


def relay_port(setup: Setup, route: str) -> int:
    return setup.client.ports[route]


def test_echo_through_the_tunnel(setup: Setup) -> None:
    with connect(relay_port(setup, "echo")) as sock:
        sock.sendall(b"hello agent")
        assert recv_exactly(sock, 11) == b"hello agent"
    closed = setup.agent.wait_for("closed", route="@agent")
    assert any(e["client"].startswith("127.0.0.1:") for e in closed)


def test_16_mib_both_ways(setup: Setup) -> None:
    payload = os.urandom(16 << 20)
    with connect(relay_port(setup, "echo")) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        received = recv_exactly(sock, len(payload))
        sender.join(DEADLINE)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_client_fin_reaches_the_target(setup: Setup) -> None:
    """TLS 1.3: a close_notify closes one direction, so the target still answers after the FIN."""
    with connect(relay_port(setup, "fin")) as sock:
        sock.sendall(b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"after fin: 1000"


def test_proxy_header_travels_inside_the_tunnel(setup: Setup) -> None:
    with connect(relay_port(setup, "proxied")) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        source = sock.getsockname()
    info = setup.proxied.headers[-1]
    assert info.version == 2
    assert info.source == source


def test_target_outside_allow_targets_is_refused(setup: Setup) -> None:
    with connect(relay_port(setup, "denied")) as sock:
        sock.sendall(b"hello")
        assert recv_all(sock) == b""
    refused = setup.agent.wait_for("agent-denied")
    assert refused[-1]["target"] == f"127.0.0.1:{setup.denied.port}"
    assert setup.denied.accepted == 0


@pytest.mark.parametrize("which, alert", [("other CA", "UNKNOWN_CA"), ("no certificate", "CERTIFICATE_REQUIRED")])
def test_foreign_or_missing_client_certificate_is_refused(
    setup: Setup, other_ca: TestCA, which: str, alert: str  # noqa: F811
) -> None:
    """The agent's alert says why; its log has the refusal (one a period: the rest are counted)."""
    cert = other_ca.client("intruder") if which == "other CA" else None
    accepted = setup.echo.accepted
    with pytest.raises(ssl.SSLError, match=alert):
        with open_tunnel(setup.agent_port, client_context(setup.ca, cert)) as tls:
            tls.sendall(header("127.0.0.1", setup.echo.port) + b"data")
            tls.recv(100)
    setup.agent.wait_for("agent-tls")
    assert setup.echo.accepted == accepted


def test_bad_checksum_is_refused(setup: Setup) -> None:
    accepted = setup.echo.accepted
    with open_tunnel(setup.agent_port, client_context(setup.ca, setup.client_cert)) as tls:
        tls.sendall(header("127.0.0.1", setup.echo.port, corrupt=True) + b"data")
        assert tls.recv(100) == b""
    assert setup.agent.wait_for("agent-header")[-1]["reason"] == "bad checksum"
    assert setup.echo.accepted == accepted


def test_no_header_in_time_is_refused(setup: Setup) -> None:
    with open_tunnel(setup.agent_port, client_context(setup.ca, setup.client_cert)) as tls:
        tls.sendall(header("127.0.0.1", setup.echo.port)[:100])
        assert tls.recv(100) == b""
    setup.agent.wait_for("agent-header", reason="no header within header_timeout")


def test_probe_is_answered_without_dialing(setup: Setup) -> None:
    accepted = setup.echo.accepted
    with open_tunnel(setup.agent_port, client_context(setup.ca, setup.client_cert)) as tls:
        tls.sendall(header("127.0.0.1", setup.echo.port, flags=1))
        assert tls.recv(100) == b""
    setup.agent.wait_for("closed", route="@agent", reason="probe")
    assert setup.echo.accepted == accepted


def test_test_side_client_talks_to_the_agent(setup: Setup) -> None:
    with open_tunnel(setup.agent_port, client_context(setup.ca, setup.client_cert)) as tls:
        assert tls.selected_alpn_protocol() == ALPN
        tls.sendall(header("127.0.0.1", setup.echo.port) + b"interop")
        assert recv_exactly(tls, 7) == b"interop"


def test_test_side_agent_serves_the_client_route(setup: Setup) -> None:
    with connect(relay_port(setup, "fake")) as sock:
        sock.sendall(b"to the fake agent")
        assert recv_exactly(sock, 17) == b"to the fake agent"
    # The client relay's health checks probe the fake agent too: skip their headers (flags bit 0).
    sent = [received for received in setup.fake.headers if not received[270] & 1][-1]
    assert sent == header("127.0.0.1", 7)
    assert setup.fake.alpn[-1] == ALPN


def https_get(setup: Setup, cert: Issued | None, path: str) -> bytes:
    with open_tunnel(setup.agent_port, client_context(setup.ca, cert, "http/1.1")) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: godoxy.agent\r\nConnection: close\r\n\r\n".encode())
        return recv_all(tls)


def test_status_over_https_needs_a_client_certificate(setup: Setup) -> None:
    answer = https_get(setup, setup.client_cert, "/healthz")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(setup, None, "/healthz")


def agent_files(ca: TestCA) -> str:
    issued = ca.server("godoxy.agent", key_type="ec")
    return f"ca: {ca.cert}, cert: {issued.cert}, key: {issued.key}"


def test_dump_writes_the_agent_blocks_back(ecdsa_ca: TestCA) -> None:  # noqa: F811
    files = agent_files(ecdsa_ca)
    original = parse_config(f"""
agent: {{listen: "127.0.0.1:8890", {files}, allow_targets: ["10.0.0.0/8:22", any]}}
agents:
  edge: {{address: "192.0.2.1:8890", {files}, server_name: edge.agent}}
routes:
  ssh: {{scheme: tcp, port: "2222:22", host: 10.0.0.5, agent: edge}}
""", "agent.yml")
    written = dump(original)
    loaded = parse_config(written, "agent.yml")
    assert loaded == original
    assert loaded.routes[0].agent is not None and loaded.routes[0].agent.server_name == "edge.agent"


def test_udp_routes_and_agent_health_settings_load(ecdsa_ca: TestCA) -> None:  # noqa: F811
    config = parse_config(f"""
agents:
  edge: {{address: "192.0.2.1:8890", {agent_files(ecdsa_ca)}, healthcheck: {{interval: 2s, retries: 4}}}}
routes:
  dns: {{scheme: udp, port: "5353:53", host: 10.0.0.53, agent: edge}}
""", "agent.yml")
    [edge] = config.agents
    assert (edge.healthcheck.interval, edge.healthcheck.timeout, edge.healthcheck.retries) == (2.0, 5.0, 4)
    assert config.routes[0].protocol == "udp" and config.routes[0].agent == edge


@pytest.mark.parametrize("body, message", [
    ("agent: {{listen: 8890, {files}}}\n", "field 'agent.allow_targets': required"),
    ("agent: {{listen: 8890, ca: /nonexistent, cert: /nonexistent, key: /nonexistent, allow_targets: [any]}}\n",
     "field 'agent': /nonexistent: cannot read"),
    ("routes:\n  r: {{scheme: tcp, port: '1:2', agent: nowhere}}\n",
     "route 'r': field 'agent': 'nowhere' is not in agents"),
    ("agents: {{edge: {{address: '127.0.0.1:1', {files}, healthcheck: {{send: x}}}}}}\n",
     "field 'agents.edge.healthcheck.send': unknown field (known fields: interval, retries, timeout)"),
    ("agent: {{listen: 8890, {files}, allow_targets: [any]}}\nroutes:\n  dns: {{scheme: udp, port: '8890:53'}}\n",
     "udp [::]:8890 clashes with route 'dns'"),
])
def test_config_errors_name_the_field(ecdsa_ca: TestCA, body: str, message: str) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(body.format(files=agent_files(ecdsa_ca)), "agent.yml")


# -- UDP: DTLS sessions through the agent


def udp_client(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(DEADLINE)
    sock.bind(("127.0.0.1", 0))
    sock.connect(("127.0.0.1", port))
    return sock


def agent_sessions(setup: Setup) -> list[dict]:
    return setup.agent.actions("session-open", route="@agent", target=f"127.0.0.1:{setup.udp_echo.port}")


def test_1000_datagrams_from_50_sources(setup: Setup) -> None:
    """Each source gets a DTLS session of its own: 50 at the agent, 50 senders at the target."""
    opened = len(agent_sessions(setup))
    received = len(setup.udp_echo.received)
    clients = [udp_client(relay_port(setup, "udp")) for _ in range(50)]
    try:
        for round_ in range(20):  # in waves of 50: each source's datagram, then its echo
            for i, sock in enumerate(clients):
                sock.send(b"source %d round %d" % (i, round_))
            for i, sock in enumerate(clients):
                assert sock.recv(65535) == b"source %d round %d" % (i, round_)
    finally:
        for sock in clients:
            sock.close()
    poll(lambda: len(agent_sessions(setup)) == opened + 50)
    new = setup.udp_echo.received[received:]
    assert len(new) == 1000
    assert len({sender for sender, _ in new}) == 50
    metrics = https_get(setup, setup.client_cert, "/metrics").decode()
    sessions = re.search(r'^streamrelay_udp_sessions_opened_total\{protocol="tcp",route="@agent"\} (\S+)$', metrics, re.M)
    assert sessions is not None and float(sessions[1]) >= 50


def test_oversized_datagram_is_dropped_and_counted(setup: Setup) -> None:
    with udp_client(relay_port(setup, "udp")) as sock:
        sock.send(b"x" * (16384 + 1))
        sock.send(b"after the big one")
        assert sock.recv(65535) == b"after the big one"
    dropped = setup.client.wait_for("dtls-oversized", route="udp")
    assert dropped[-1]["size"] == 16385 and dropped[-1]["limit"] == 16384


def test_udp_target_outside_allow_targets_is_refused(setup: Setup) -> None:
    with udp_client(relay_port(setup, "udp-denied")) as sock:
        sock.send(b"let me in")
        setup.client.wait_for("session-closed", route="udp-denied", reason="agent: closed by peer")
    refused = setup.agent.wait_for("agent-denied", target=f"127.0.0.1:{setup.udp_denied.port}")
    assert refused
    assert setup.udp_denied.received == []


def s_client(setup: Setup, cert: Issued, data: bytes) -> subprocess.CompletedProcess:
    """The system's OpenSSL as a test-side DTLS client of the agent: C{data} as one record."""
    command = [
        "openssl", "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{setup.agent_port}", "-cert", str(cert.cert),
        "-key", str(cert.key), "-CAfile", str(setup.ca.cert), "-verify_return_error",
        "-verify_hostname", "godoxy.agent", "-quiet", "-ign_eof",
    ]
    return subprocess.run(command, input=data, capture_output=True, timeout=DEADLINE)


def test_udp_probe_is_answered_without_dialing(setup: Setup) -> None:
    """The agent closes the session (close_notify: s_client exits 0) and opens nothing."""
    opened = len(agent_sessions(setup))
    received = len(setup.udp_echo.received)
    done = s_client(setup, setup.client_cert, header("127.0.0.1", setup.udp_echo.port, flags=1))
    assert done.returncode == 0, done.stderr
    assert len(agent_sessions(setup)) == opened
    assert len(setup.udp_echo.received) == received


def test_udp_client_certificate_from_another_ca_is_refused(
    setup: Setup, other_ca: TestCA  # noqa: F811
) -> None:
    received = len(setup.udp_echo.received)
    done = s_client(setup, other_ca.client("intruder", key_type="ec"), header("127.0.0.1", setup.udp_echo.port))
    assert done.returncode != 0 and b"unknown ca" in done.stderr, done.stderr
    assert len(setup.udp_echo.received) == received


# -- interop over DTLS: a test-side client and agent on pyOpenSSL alone


def parse_header(raw: bytes) -> tuple[str, int, int]:
    """C{(host, port, flags)} of a request header, checked as the wire format says an agent must."""
    assert len(raw) == 275
    assert struct.unpack(">I", raw[271:])[0] == zlib.crc32(raw[:271])
    assert raw[:8] == b"0.1.0".ljust(8, b"\0")
    host_length, port_length = raw[8], raw[264]
    assert 1 <= port_length <= 5
    port = int(raw[265:265 + port_length].decode("ascii"))
    assert 1 <= port <= 65535
    return raw[9:9 + host_length].decode(), port, raw[270]


def dtls_context(ca: TestCA, cert: Issued) -> SSL.Context:
    """DTLS, mutual authentication under C{ca}; memory BIOs cannot ask the kernel for the MTU."""
    context = SSL.Context(SSL.DTLS_METHOD)
    context.use_certificate_file(str(cert.cert))
    context.use_privatekey_file(str(cert.key))
    context.load_verify_locations(str(ca.cert))
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    context.set_options(SSL.OP_NO_QUERY_MTU)
    return context


class DTLSPeer:
    """
    One DTLS session on memory BIOs over a connected UDP socket: whatever
    OpenSSL has to send after a step leaves as one datagram, so every
    application record is a datagram of its own.
    """

    def __init__(self, connection: SSL.Connection, sock: socket.socket) -> None:
        connection.set_ciphertext_mtu(1400)
        self.connection, self.sock = connection, sock

    def flush(self) -> None:
        try:
            self.sock.send(self.connection.bio_read(65535))
        except SSL.WantReadError:
            pass

    def feed(self) -> None:
        """Hand OpenSSL the next datagram, resending the last flight whenever its timer runs out."""
        deadline = time.monotonic() + DEADLINE
        while True:
            left = deadline - time.monotonic()
            timer = self.connection.DTLSv1_get_timeout()
            self.sock.settimeout(max(min(left, left if timer is None else timer), 0.001))
            try:
                self.connection.bio_write(self.sock.recv(65535))
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
                self.connection.DTLSv1_handle_timeout()
                self.flush()

    def handshake(self) -> None:
        while True:
            try:
                self.connection.do_handshake()
            except SSL.WantReadError:
                self.flush()
                self.feed()
            else:
                self.flush()
                return

    def send(self, data: bytes) -> None:
        self.connection.send(data)
        self.flush()

    def recv(self) -> bytes:
        while True:
            try:
                return self.connection.recv(65535)
            except SSL.WantReadError:
                self.flush()
                self.feed()


def test_test_side_dtls_client_talks_to_the_agent(setup: Setup) -> None:
    """A DTLS 1.2 session to the agent's UDP port: the header, then one record per datagram, each echoed."""
    connection = SSL.Connection(dtls_context(setup.ca, setup.client_cert), None)
    connection.set_connect_state()
    connection.set_tlsext_host_name(b"godoxy.agent")
    received = len(setup.udp_echo.received)
    with udp_client(setup.agent_port) as sock:
        peer = DTLSPeer(connection, sock)
        peer.handshake()
        assert connection.get_protocol_version_name() == "DTLSv1.2"
        agent = connection.get_peer_certificate(as_cryptography=True)
        assert agent is not None
        names = agent.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["godoxy.agent"]
        peer.send(header("127.0.0.1", setup.udp_echo.port))
        for i in range(5):
            peer.send(b"dtls interop %d" % i)
            assert peer.recv() == b"dtls interop %d" % i
        connection.shutdown()
        peer.flush()
    assert [data for _, data in setup.udp_echo.received[received:]] == [b"dtls interop %d" % i for i in range(5)]


class FakeDTLSAgent:
    """
    A GoDoxy-style DTLS agent from the wire format on UDP C{port}: a
    stateless cookie exchange, mutual authentication, the header, then
    echoes. It serves one session, the first source that returns its cookie.
    """

    def __init__(self, ca: TestCA, cert: Issued, port: int) -> None:
        self.context = dtls_context(ca, cert)
        cookie = os.urandom(16)
        self.context.set_cookie_generate_callback(lambda connection: cookie)
        self.context.set_cookie_verify_callback(lambda connection, offered: offered == cookie)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(DEADLINE)
        self.headers: list[bytes] = []
        self.client_names: list[str] = []
        self.failure: Exception | None = None
        threading.Thread(target=self.serve, daemon=True).start()

    def accept(self) -> DTLSPeer:
        """Answer each ClientHello with a HelloVerifyRequest, keeping no state, until one carries the cookie."""
        connection = SSL.Connection(self.context, None)
        connection.set_accept_state()
        while True:
            data, source = self.sock.recvfrom(65535)
            connection.bio_write(data)
            try:
                connection.DTLSv1_listen()
            except SSL.WantReadError:
                self.sock.sendto(connection.bio_read(65535), source)
                continue
            self.sock.connect(source)
            return DTLSPeer(connection, self.sock)

    def serve(self) -> None:
        try:
            peer = self.accept()
            peer.handshake()
            client = peer.connection.get_peer_certificate(as_cryptography=True)
            assert client is not None
            self.client_names.append(client.subject.rfc4514_string())
            self.headers.append(peer.recv())
            while True:
                peer.send(peer.recv())
        except (OSError, SSL.Error, AssertionError) as failure:
            self.failure = failure

    def close(self) -> None:
        self.sock.close()


def test_test_side_dtls_agent_serves_the_client_route(setup: Setup) -> None:
    """The fake agent shares the TCP one's port number, so the route's C{agent: fake} reaches it over UDP."""
    fake = FakeDTLSAgent(setup.ca, setup.agent_cert, setup.fake.port)
    try:
        with udp_client(relay_port(setup, "udp-fake")) as sock:
            for i in range(5):
                sock.send(b"to the dtls agent %d" % i)
                assert sock.recv(65535) == b"to the dtls agent %d" % i, fake.failure
    finally:
        fake.close()
    assert parse_header(fake.headers[0]) == ("127.0.0.1", 9, 0)
    assert fake.client_names == ["CN=streamrelay"]


# -- health checks of agents entries


def test_agent_health_follows_the_agent_process(tmp_path, ecdsa_ca: TestCA) -> None:  # noqa: F811
    """Probes every 0.2 s, down after 2 failures: a killed agent is down within a second, a new one up again."""
    from tests.test_status import metrics, snapshot, status_listen

    files = agent_files(ecdsa_ca)
    client_cert = ecdsa_ca.client("streamrelay", key_type="ec")

    def agent_config(port: int) -> Path:
        """An agent that allows no target the probe names: a probe is answered all the same."""
        text = f'agent: {{listen: "127.0.0.1:{port}", {files}, allow_targets: ["127.0.0.1/32:1"]}}\nroutes: {{}}\n'
        return write_config(tmp_path, text, "agent.yml")

    up = ("streamrelay_agent_up", frozenset({("agent", "edge")}))
    with Relay(agent_config(0), wait=False) as agent:
        port = int(agent.wait_for("start", route="@agent")[0]["listen"].rsplit(":", 1)[1])
        client_path = write_config(tmp_path, f"""
status: {{listen: "127.0.0.1:0"}}
agents:
  edge:
    address: "127.0.0.1:{port}"
    ca: {ecdsa_ca.cert}
    cert: {client_cert.cert}
    key: {client_cert.key}
    healthcheck: {{interval: 200ms, timeout: 1s, retries: 2}}
routes:
  r: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ":1", agent: edge}}
""", "client.yml")
        with Relay(client_path) as client:
            listen = status_listen(client)
            poll(lambda: snapshot(listen)["agents"][0]["last_check"] is not None)
            [edge] = snapshot(listen)["agents"]
            assert edge["agent"] == "edge" and edge["up"] and edge["last_error"] is None
            assert metrics(listen)[up] == 1
            assert agent.actions("agent-denied") == []
            agent.process.kill()
            agent.stop()
            killed = time.monotonic()
            down = client.wait_for("agent-down", agent="edge", timeout=0.2 * 2 + 1.5)
            assert time.monotonic() - killed < 0.2 * 2 + 1.5
            assert "refused" in down[0]["reason"]
            assert metrics(listen)[up] == 0
            assert snapshot(listen)["agents"][0]["up"] is False
            with Relay(agent_config(port), wait=False) as again:
                again.wait_for("start", route="@agent")
                client.wait_for("agent-up", agent="edge", reason="check passed")
                assert metrics(listen)[up] == 1


class AgentProbeTests(TestCase):
    """L{AgentProbe} on its own, against the agent process and the test-side agent."""

    @pytest.fixture(autouse=True)
    def agents(self, setup: Setup, other_ca: TestCA) -> None:  # noqa: F811
        self.setup, self.other_ca = setup, other_ca

    def probe(self, ca: TestCA) -> AgentProbe:
        cert = self.setup.client_cert
        upstream = UpstreamTLSConfig(
            server_name="godoxy.agent", ca=str(ca.cert), cert=str(cert.cert), key=str(cert.key), alpn=(ALPN,)
        )
        return AgentProbe(tls_client_context(upstream), "godoxy.agent", header("127.0.0.1", 1, flags=1))

    async def test_the_agent_passes(self) -> None:
        await self.probe(self.setup.ca).check(reactor, "127.0.0.1", self.setup.agent_port, DEADLINE)

    async def test_an_agent_the_ca_did_not_sign_fails(self) -> None:
        with self.assertRaisesRegex(CheckFailed, "^tls: certificate verify failed"):
            await self.probe(self.other_ca).check(reactor, "127.0.0.1", self.setup.agent_port, DEADLINE)

    async def test_an_agent_that_keeps_the_probe_open_fails(self) -> None:
        """The test-side agent reads the header and waits for more: the probe's timeout ends it."""
        with self.assertRaisesRegex(CheckFailed, "^the agent did not close the probe within 0.5s$"):
            await self.probe(self.setup.ca).check(reactor, "127.0.0.1", self.setup.fake.port, 0.5)
