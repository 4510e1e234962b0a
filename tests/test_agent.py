"""
Agent tunnels (GoDoxy's wire format) end to end: one streamrelay process
with C{agent:} and one with C{agents:} and routes through it, plus a
test-side client and a test-side agent written from the wire format with
Python's C{ssl}, not from the project's code.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import ssl
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from streamrelay.config import ConfigError, parse_config
from streamrelay.dump import dump
from tests.harness import (
    DEADLINE, HeaderTarget, Relay, Target, connect, recv_all, recv_exactly, write_config,
)
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
    with Target() as echo, HeaderTarget() as proxied, Target() as denied, Target(reply_after_fin) as fin:
        allowed = f"127.0.0.1/32:{echo.port},{proxied.port},{fin.port}"
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
        with Relay(agent_path, wait=False) as agent:
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
            )
            client_path = write_config(directory, f"""
agents:
  edge: {{address: "127.0.0.1:{agent_port}", {tls}}}
  fake: {{address: "127.0.0.1:{fake.port}", {tls}}}
routes:
{routes}""", "client.yml")
            with Relay(client_path) as client:
                yield Setup(agent, client, agent_port, echo, proxied, denied, fake, ecdsa_ca, client_cert)
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
    sent = setup.fake.headers[-1]
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


@pytest.mark.parametrize("body, message", [
    ("agent: {{listen: 8890, {files}}}\n", "field 'agent.allow_targets': required"),
    ("agent: {{listen: 8890, ca: /nonexistent, cert: /nonexistent, key: /nonexistent, allow_targets: [any]}}\n",
     "field 'agent': /nonexistent: cannot read"),
    ("agents: {{edge: {{address: '127.0.0.1:1', {files}}}}}\nroutes:\n  r: {{scheme: udp, port: '1:2', agent: edge}}\n",
     "route 'r': field 'agent': only for tcp routes"),
    ("routes:\n  r: {{scheme: tcp, port: '1:2', agent: nowhere}}\n",
     "route 'r': field 'agent': 'nowhere' is not in agents"),
])
def test_config_errors_name_the_field(ecdsa_ca: TestCA, body: str, message: str) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(body.format(files=agent_files(ecdsa_ca)), "agent.yml")
