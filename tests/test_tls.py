"""
TLS on routes, end to end with real peers: terminating (Python's ssl, curl,
openssl s_client), originating (openssl s_server, a TLS echo server), and
routing on the server name with passthrough, behind HAProxy's PROXY header.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import ssl
import select
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509

from tests.harness import (
    DEADLINE, HAProxy, HeaderTarget, Relay, Target, connect, connect_from, free_port, needs_haproxy, poll,
    recv_all, recv_exactly, run_twistd, write_config,
)
from tests.tls_ca import Issued, TestCA, other_ca, tls_ca  # noqa: F401  (fixtures)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def route(name: str, target_port: int, port: int | str = "", **fields: object) -> str:
    """A tcp4 route on 127.0.0.1 with nested YAML fields given as flow mappings."""
    extra = "".join(f"    {k}: {v}\n" for k, v in fields.items())
    return f"  {name}:\n    scheme: tcp4\n    bind: 127.0.0.1\n    host: 127.0.0.1\n    port: '{port}:{target_port}'\n{extra}"


def tls_block(issued: Issued, **extra: object) -> str:
    fields = {"cert": str(issued.cert), "key": str(issued.key), **extra}
    return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


def client_context(ca: TestCA, cert: Issued | None = None, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def tls_connect(port: int, context: ssl.SSLContext, name: str, source: str = "127.0.0.1") -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
    return context.wrap_socket(sock, server_hostname=name)


def exchange(sock: ssl.SSLSocket, payload: bytes) -> bytes:
    """
    Send C{payload} while reading what comes back, until as much came back:
    one thread, as an SSL object cannot be read and written from two at once.
    """
    sock.setblocking(False)
    sent, received = 0, []
    size = 0
    deadline = time.monotonic() + 4 * DEADLINE
    while size < len(payload):
        assert time.monotonic() < deadline, f"{size} of {len(payload)} bytes came back"
        want_write = sent < len(payload)
        readable, writable, _ = select.select([sock], [sock] if want_write else [], [], DEADLINE)
        if writable:
            try:
                sent += sock.send(payload[sent : sent + (1 << 16)])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
        if readable or sock.pending():
            try:
                while chunk := sock.recv(1 << 20):
                    received.append(chunk)
                    size += len(chunk)
                    if not sock.pending():
                        break
                else:
                    raise AssertionError(f"EOF after {size} bytes")
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
    sock.setblocking(True)
    return b"".join(received)


class TLSTarget(Target):
    """An echo server that speaks TLS with C{issued}'s certificate."""

    def __init__(self, issued: Issued) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(issued.cert), str(issued.key))
        super().__init__(self.handle)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await writer.start_tls(self.context)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@pytest.fixture(scope="module")
def app(tls_ca: TestCA) -> Issued:
    return tls_ca.server("app.example", "b.example", "c.example", "d.example", "other.example")


# -- terminating


def test_terminate_16mib_both_ways(tmp_path: Path, tls_ca: TestCA, app: Issued) -> None:
    payload = os.urandom(16 << 20)
    with Target() as target:
        text = "routes:\n" + route("secure", target.port, tls=tls_block(app))
        with Relay(write_config(tmp_path, text)) as relay:
            with tls_connect(relay.ports["secure"], client_context(tls_ca), "app.example") as sock:
                assert sock.version() in ("TLSv1.2", "TLSv1.3")
                echoed = exchange(sock, payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            closed = relay.wait_for("closed")[0]
            assert closed["bytes_up"] == closed["bytes_down"] == len(payload)


def test_terminate_half_close_carries_the_fin(tmp_path: Path, tls_ca: TestCA, app: Issued) -> None:
    """close_notify and FIN from the client reach the target as a FIN; its reply still comes back."""

    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until EOF
        writer.write(b"got " + request)
        await writer.drain()

    with Target(reply_after_eof) as target:
        text = "routes:\n" + route("secure", target.port, tls=tls_block(app, min_version='"1.3"'))
        with Relay(write_config(tmp_path, text)) as relay:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client_context(tls_ca).wrap_bio(incoming, outgoing, server_hostname="app.example")
            with connect(relay.ports["secure"]) as sock:

                def pump() -> bool:
                    if outgoing.pending:
                        sock.sendall(outgoing.read())
                    data = sock.recv(65536)
                    if not data:
                        incoming.write_eof()
                        return False
                    incoming.write(data)
                    return True

                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        pump()
                tls.write(b"question")
                with pytest.raises(ssl.SSLWantReadError):
                    tls.unwrap()  # sends close_notify; the relay's comes later
                sock.sendall(outgoing.read())
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while True:
                    try:
                        answer += tls.read(65536)
                    except ssl.SSLWantReadError:
                        if not pump():
                            break
                    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                        break
            assert answer == b"got question"
            assert relay.wait_for("closed")[0]["bytes_up"] == len(b"question")


@needs_curl
def test_terminate_with_curl(tmp_path: Path, tls_ca: TestCA, app: Issued) -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()

    with Target(http) as target:
        text = "routes:\n" + route("web", target.port, tls=tls_block(app, alpn='["http/1.1"]'))
        with Relay(write_config(tmp_path, text)) as relay:
            port = relay.ports["web"]
            result = subprocess.run(
                ["curl", "-sS", "--cacert", str(tls_ca.cert), "--resolve", f"app.example:{port}:127.0.0.1",
                 f"https://app.example:{port}/"],
                capture_output=True, text=True, timeout=DEADLINE,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout == "hello"


def test_verify_client_require(tmp_path: Path, tls_ca: TestCA, other_ca: TestCA, app: Issued) -> None:
    """No certificate, or one from another CA: closed with a log line saying why; never dialed."""
    alice = tls_ca.client("alice")
    with HeaderTarget() as target:
        block = tls_block(app, client_ca=tls_ca.cert, verify_client="require", alpn='["h2", "http/1.1"]')
        text = "routes:\n" + route("mtls", target.port, tls=block, relay_proxy_protocol_header="true")
        with Relay(write_config(tmp_path, text)) as relay:
            port = relay.ports["mtls"]
            for cert in (None, other_ca.client("mallory")):
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    with tls_connect(port, client_context(tls_ca, cert), "app.example") as sock:
                        sock.sendall(b"x")
                        assert sock.recv(1) == b""  # TLS 1.3 reports the refusal on the first read
            failures = relay.wait_for("tls-failed", count=1)
            assert "certificate" in failures[0]["reason"]
            with tls_connect(port, client_context(tls_ca, alice, alpn=["h2"]), "app.example") as sock:
                sock.sendall(b"ping")
                assert recv_exactly(sock, 4) == b"ping"
            assert target.accepted == 1
            header = target.headers[0]
            assert header.authority == "app.example"
            assert header.alpn == "h2"
            assert header.ssl is not None and header.ssl.cn == "alice" and header.ssl.verified
            assert header.ssl.client_cert_conn and header.ssl.version in ("TLSv1.2", "TLSv1.3")


def test_bad_certificate_files_are_config_errors(tmp_path: Path, tls_ca: TestCA, app: Issued) -> None:
    expired = tls_ca.expired("old.example")
    mismatched = f"{{cert: {app.cert}, key: {tls_ca.client('bob', key_type='ec').key}}}"
    cases = {
        tls_block(expired): str(expired.cert),
        mismatched: "key",
        f"{{cert: {tmp_path / 'missing.crt'}, key: {app.key}}}": "missing.crt",
    }
    for block, named in cases.items():
        path = write_config(tmp_path, "routes:\n" + route("secure", 1, tls=block))
        result = run_twistd(path)
        assert result.returncode != 0
        assert "route 'secure'" in result.stderr and named in result.stderr, result.stderr


# -- originating


@needs_openssl
def test_originate_to_openssl_s_server(tmp_path: Path, tls_ca: TestCA, app: Issued) -> None:
    port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(app.cert), "-key", str(app.key),
         "-rev", "-quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        upstream = f"{{server_name: app.example, ca: {tls_ca.cert}}}"
        text = "routes:\n" + route("out", port, upstream_tls=upstream)
        with Relay(write_config(tmp_path, text)) as relay:

            def answered() -> bytes:
                with connect(relay.ports["out"]) as sock:  # s_server may still be starting
                    sock.sendall(b"hello\n")
                    return sock.recv(64)

            assert poll(answered) == b"olleh\n"  # -rev: each line reversed
    finally:
        server.kill()
        server.wait()


def test_originate_refuses_a_target_named_otherwise(tmp_path: Path, tls_ca: TestCA) -> None:
    with TLSTarget(tls_ca.server("other.example")) as target:
        upstream = f"{{server_name: db.example, ca: {tls_ca.cert}}}"
        text = "routes:\n" + route("out", target.port, upstream_tls=upstream)
        with Relay(write_config(tmp_path, text)) as relay:
            with connect(relay.ports["out"]) as sock:
                sock.sendall(b"secret")
                assert recv_all(sock) == b""  # closed, nothing sent in the clear
            failed = relay.wait_for("dial-failed")[0]
            assert failed["reason"].startswith("tls:") and "db.example" in failed["reason"]
            good = f"{{server_name: other.example, ca: {tls_ca.cert}}}"
            write_config(tmp_path, "routes:\n" + route("out", target.port, upstream_tls=good))
            relay.process.send_signal(1)  # SIGHUP: reload
            relay.wait_for("reload")
            with connect(relay.ports["out"]) as sock:
                sock.sendall(b"secret")
                assert recv_exactly(sock, 6) == b"secret"


# -- routing on the server name


@pytest.fixture
def sni_targets() -> Iterator[list[Target]]:
    targets = [Target(_tagged(name)) for name in (b"a", b"b", b"default")]
    yield targets
    for target in targets:
        target.close()


def _tagged(tag: bytes):  # type: ignore[no-untyped-def]
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(64)
        writer.write(tag + b":" + data)
        await writer.drain()

    return answer


@needs_openssl
def test_sni_three_names_and_a_default_on_one_port(
    tmp_path: Path, tls_ca: TestCA, app: Issued, sni_targets: list[Target]
) -> None:
    port = free_port()
    c_cert = tls_ca.server("c.example")
    passthrough_port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{passthrough_port}", "-cert", str(c_cert.cert),
         "-key", str(c_cert.key), "-rev", "-quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    a, b, default = sni_targets
    text = "routes:\n" + "".join([
        route("a", a.port, port, sni='["app.example"]', tls=tls_block(app)),
        route("b", b.port, port, sni='["*.b.example", "b.example"]', tls=tls_block(app)),
        route("c", passthrough_port, port, sni='["c.example"]', tls_passthrough="true", splice="true"),
        route("rest", default.port, port, sni='["*"]', tls=tls_block(app)),
    ])
    try:
        with Relay(write_config(tmp_path, text)) as relay:
            assert set(relay.ports.values()) == {port}
            context = client_context(tls_ca)
            for name, expected in (("app.example", b"a:hi"), ("b.example", b"b:hi"), ("d.example", b"default:hi")):
                with tls_connect(port, context, name) as sock:
                    sock.sendall(b"hi")
                    assert recv_all(sock) == expected
            context.check_hostname = True

            def reversed_line() -> bytes:
                with tls_connect(port, context, "c.example") as sock:  # verifies s_server's own certificate
                    sock.sendall(b"hello\n")
                    return sock.recv(64)

            assert poll(reversed_line) == b"olleh\n"
    finally:
        server.kill()
        server.wait()


def test_sni_unknown_name_without_default_is_closed_undialed(tmp_path: Path, tls_ca: TestCA, app: Issued) -> None:
    with Target() as target:
        port = free_port()
        text = "routes:\n" + route("a", target.port, port, sni='["app.example"]', tls=tls_block(app))
        with Relay(write_config(tmp_path, text)) as relay:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with tls_connect(port, client_context(tls_ca), "nobody.example") as sock:
                    sock.recv(1)
            refused = relay.wait_for("no-route")[0]
            assert refused["sni"] == "nobody.example"
            assert target.accepted == 0


def _client_hello(name: str) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return tls, incoming, outgoing, outgoing.read()


def test_sni_hello_in_one_byte_writes(tmp_path: Path, tls_ca: TestCA, app: Issued, sni_targets: list[Target]) -> None:
    a, _, _ = sni_targets
    port = free_port()
    text = "routes:\n" + route("a", a.port, port, sni='["app.example"]', tls=tls_block(app))
    with Relay(write_config(tmp_path, text)) as relay:
        context = client_context(tls_ca)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="app.example")
        with connect(port) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            for byte in outgoing.read():
                sock.send(bytes([byte]))
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        sock.sendall(outgoing.read())
                    incoming.write(sock.recv(65536))
            tls.write(b"hi")
            sock.sendall(outgoing.read())
            answer = b""
            while not answer:
                try:
                    answer = tls.read(64)
                except ssl.SSLWantReadError:
                    incoming.write(sock.recv(65536))
        assert answer == b"a:hi"
        assert relay.actions("bad-hello") == []


@pytest.mark.parametrize("first_bytes", [
    b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n",
    b"\x16\x03\x01\x00\x00",  # an empty record
    b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
    b"\x80\x2e\x01\x03\x01",  # SSLv2
])
def test_sni_malformed_hellos_are_refused_undialed(tmp_path: Path, app: Issued, first_bytes: bytes) -> None:
    with Target() as target:
        port = free_port()
        text = "routes:\n" + route("a", target.port, port, sni='["*"]', tls=tls_block(app))
        with Relay(write_config(tmp_path, text)) as relay:
            with connect(port) as sock:
                sock.sendall(first_bytes)
                with pytest.raises(ConnectionResetError):
                    while sock.recv(1024):
                        pass
            assert relay.wait_for("bad-hello")[0]["route"] == "a"
            assert target.accepted == 0


def test_sni_hello_timeout(tmp_path: Path, app: Issued) -> None:
    with Target() as target:
        port = free_port()
        text = "routes:\n" + route("a", target.port, port, sni='["*"]', tls=tls_block(app), tls_hello_timeout="200ms")
        with Relay(write_config(tmp_path, text)) as relay:
            with connect(port) as sock:
                sock.sendall(_client_hello("app.example")[3][:20])
                with pytest.raises(ConnectionResetError):
                    sock.recv(1024)
            assert relay.wait_for("hello-timeout")
            assert target.accepted == 0


@needs_haproxy
def test_sni_behind_haproxy_sees_the_real_client(tmp_path: Path, tls_ca: TestCA, app: Issued) -> None:
    """PROXY v2 from HAProxy before the ClientHello; the ACL and the outbound header use the real client."""
    with HeaderTarget() as target:
        port = free_port()
        inbound = "{mode: required, trusted_proxies: [127.0.0.1]}"
        text = "routes:\n" + "".join([
            route("a", target.port, port, sni='["app.example"]', tls=tls_block(app), proxy_protocol=inbound,
                  relay_proxy_protocol_header="true", acl="{default: deny, allow_local: false, allow: [ip:127.0.0.2]}"),
            route("b", target.port, port, sni='["b.example"]', tls_passthrough="true", proxy_protocol=inbound,
                  relay_proxy_protocol_header="true"),
        ])
        with Relay(write_config(tmp_path, text)) as relay:
            with HAProxy.in_front(tmp_path, port) as haproxy:
                front = haproxy.front
                with tls_connect(front, client_context(tls_ca), "app.example", source="127.0.0.2") as sock:
                    sock.sendall(b"ok")
                    assert recv_exactly(sock, 2) == b"ok"
                    client = sock.getsockname()
                assert target.headers[-1].source == client
                assert target.headers[-1].authority == "app.example"
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    with tls_connect(front, client_context(tls_ca), "app.example", source="127.0.0.3") as sock:
                        sock.recv(1)
                assert relay.wait_for("denied")[0]["client"].startswith("127.0.0.3:")
                # passthrough: the header names the server name the client asked for
                incoming_hello = _client_hello("b.example")[3]
                with connect_from("127.0.0.2", front) as sock:
                    sock.sendall(incoming_hello)
                    poll(lambda: len(target.headers) == 2)
                assert target.headers[-1].authority == "b.example"


def test_sni_config_errors(tmp_path: Path, app: Issued) -> None:
    cases = [
        (route("a", 1, 4443, sni='["x.example"]'), "'sni'"),
        (route("a", 1, 4443, sni='["x.example"]', tls_passthrough="true", tls=tls_block(app)), "'tls_passthrough'"),
        (route("a", 1, 4443, sni='["x.example"]', tls_passthrough="true")
         + route("b", 1, 4443, sni='["X.example"]', tls_passthrough="true"), "'x.example' is also route 'a'"),
        (route("a", 1, 4443, sni='["x.example"]', tls_passthrough="true")
         + route("b", 1, 4443, sni='["y.example"]', tls_passthrough="true", backlog=10), "'backlog'"),
        (route("a", 1, 4443, sni='["x.example"]', tls_passthrough="true") + route("b", 1, 4443), "clashes"),
        (route("a", 1, 4443, sni='["bad name"]', tls_passthrough="true"), "'sni'"),
    ]
    for body, expected in cases:
        result = run_twistd(write_config(tmp_path, "routes:\n" + body))
        assert result.returncode != 0
        assert expected in result.stderr, result.stderr


def test_reload_reads_a_renewed_certificate(tmp_path: Path, tls_ca: TestCA) -> None:
    first = tls_ca.server("app.example", file_name="renewed-1")
    second = tls_ca.server("app.example", file_name="renewed-2")
    cert, key = tmp_path / "app.crt", tmp_path / "app.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    with Target() as target:
        text = "routes:\n" + route("secure", target.port, tls="{cert: app.crt, key: app.key}")
        with Relay(write_config(tmp_path, text)) as relay:

            def served_serial() -> int:
                with tls_connect(relay.ports["secure"], client_context(tls_ca), "app.example") as sock:
                    der = sock.getpeercert(binary_form=True)
                assert der is not None
                return x509.load_der_x509_certificate(der).serial_number

            assert served_serial() == first.certificate.serial_number
            cert.write_bytes(second.cert.read_bytes())  # same key file: leaf certificates share one key
            relay.process.send_signal(1)
            assert relay.wait_for("reload")[0]["changed"] == "secure (tls)"
            assert served_serial() == second.certificate.serial_number


def test_check_and_dump_show_tls(tmp_path: Path, tls_ca: TestCA, app: Issued) -> None:
    from streamrelay.config import load_config, parse_config
    from streamrelay.dump import describe, dump

    alice_ca = tls_ca.cert
    text = "routes:\n" + "".join([
        route("a", 1, 4443, sni='["app.example", "*.app.example"]', tls=tls_block(app, client_ca=alice_ca, verify_client="optional", alpn='["h2"]')),
        route("b", 2, 4443, sni='["*"]', tls_passthrough="true"),
        route("c", 3, 4444, upstream_tls=f"{{server_name: db.example, ca: {alice_ca}, verify: false}}"),
    ])
    config = load_config(str(write_config(tmp_path, text)))
    assert [describe(r).split(" (")[1].split(", proxy")[0].split(", splice")[0] for r in config.routes] == [
        "sni app.example *.app.example, tls verify_client optional",
        "sni * passthrough",
        "upstream_tls db.example unverified",
    ]
    again = parse_config(dump(config), config.path)
    assert again == config
