"""
The PROXY protocol end to end: inbound modes and trust, the outbound header,
and interoperability with haproxy, curl and a second streamrelay.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from streamrelay.proxyproto import V2_SIGNATURE, build_v1, build_v2
from tests.harness import (
    HAProxy, HeaderTarget, Relay, Target, connect_from, free_port, needs_haproxy, poll, recv_all, recv_exactly, tcp_route,
    write_config,
)

CLIENT = "127.0.0.2"  # the original client; 127.0.0.1 plays the proxies



def reset_after_sending(port: int, data: bytes) -> bool:
    """Whether the relay resets a connection from CLIENT that sends C{data} (at any point)."""
    try:
        with connect_from(CLIENT, port) as sock:
            sock.sendall(data)
            recv_all(sock)
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


#: The C{splice} setting of every route this module writes (see L{splice}).
pytestmark = pytest.mark.usefixtures("relay_paths")


def route(target_port: int, name: str = "pp", **fields: object) -> str:
    return tcp_route(target_port, name, **fields)


INBOUND = "{mode: %s, trusted_proxies: [127.0.0.1], timeout: 1s, detect_timeout: 300ms}"


def test_outbound_header_v1_and_v2_carry_the_client(tmp_path: Path) -> None:
    with HeaderTarget() as target:
        routes = route(target.port, "v2", relay_proxy_protocol_header="true", proxy_protocol_unique_id="true")
        routes += route(target.port, "v1", relay_proxy_protocol_header="true", proxy_protocol_version=1)
        with Relay(write_config(tmp_path, "routes:\n" + routes)) as relay:
            for name in ("v2", "v1"):
                with connect_from(CLIENT, relay.ports[name]) as sock:
                    sock.sendall(b"payload")
                    assert recv_exactly(sock, 7) == b"payload"
                    client_port = sock.getsockname()[1]
                header = target.headers[-1]
                assert header.source == (CLIENT, client_port)
                assert header.destination == ("127.0.0.1", relay.ports[name])
                assert header.version == int(name[1])
            v2 = target.headers[0]
            closed = relay.wait_for("closed", route="v2")[0]
            assert v2.unique_id is not None and v2.unique_id.decode() == closed["unique_id"]


def test_required_mode_relays_the_real_client(tmp_path: Path) -> None:
    with HeaderTarget() as target:
        text = "routes:\n" + route(
            target.port, proxy_protocol=INBOUND % "required", relay_proxy_protocol_header="true"
        )
        with Relay(write_config(tmp_path, text)) as relay:
            with socket.create_connection(("127.0.0.1", relay.ports["pp"])) as sock:
                header = build_v2(("198.51.100.7", 4711), ("192.0.2.1", 22))
                for byte in header:  # split across many small reads
                    sock.sendall(bytes([byte]))
                sock.sendall(b"after the header")
                assert recv_exactly(sock, 16) == b"after the header"
            assert target.headers[0].source == ("198.51.100.7", 4711)
            assert target.headers[0].destination == ("192.0.2.1", 22)
            assert relay.wait_for("closed")[0]["client"] == "198.51.100.7:4711"


def test_local_and_unknown_use_the_socket_addresses(tmp_path: Path) -> None:
    with HeaderTarget() as target:
        text = "routes:\n" + route(target.port, proxy_protocol=INBOUND % "required", relay_proxy_protocol_header="true")
        with Relay(write_config(tmp_path, text)) as relay:
            for header in (build_v2(None, None, command="LOCAL"), build_v1(None, None)):
                with socket.create_connection(("127.0.0.1", relay.ports["pp"])) as sock:
                    sock.sendall(header + b"hi")
                    assert recv_exactly(sock, 2) == b"hi"
                    assert target.headers[-1].source == sock.getsockname()


def test_local_with_any_family_is_accepted(tmp_path: Path) -> None:
    """The spec: a LOCAL header's address block is ignored, family included (HAProxy agrees)."""
    local_unspec_stream = V2_SIGNATURE + b"\x20\x01" + struct.pack("!H", 0)
    with HeaderTarget() as target:
        text = "routes:\n" + route(target.port, proxy_protocol=INBOUND % "required", relay_proxy_protocol_header="true")
        with Relay(write_config(tmp_path, text)) as relay:
            with socket.create_connection(("127.0.0.1", relay.ports["pp"])) as sock:
                sock.sendall(local_unspec_stream + b"health")
                assert recv_exactly(sock, 6) == b"health"
                peer = sock.getsockname()
            assert target.headers[0].source == peer
            assert relay.wait_for("closed")[0]["client"] == f"{peer[0]}:{peer[1]}"
            assert not relay.actions("rejected")


@pytest.mark.parametrize(
    "header, reason",
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 80\r\n", "invalid PROXY header"),
        (b"PROXY TCP4 ::1 ::1 80 80\r\n", "invalid PROXY header"),
        (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 65535 - 16), "invalid PROXY header"),
        (b"GET / HTTP/1.0\r\n\r\n", "invalid PROXY header"),
    ],
)
def test_bad_headers_close_the_connection_without_dialing(tmp_path: Path, header: bytes, reason: str) -> None:
    with HeaderTarget() as target:
        text = "routes:\n" + route(target.port, proxy_protocol=INBOUND % "required")
        with Relay(write_config(tmp_path, text)) as relay:
            with socket.create_connection(("127.0.0.1", relay.ports["pp"])) as sock:
                sock.sendall(header)
                with pytest.raises(ConnectionResetError):  # rejections abort
                    recv_all(sock)
            assert reason in relay.wait_for("rejected")[0]["reason"]
            assert target.accepted == 0


def test_slow_header_is_cut_at_the_timeout(tmp_path: Path) -> None:
    with HeaderTarget() as target:
        text = "routes:\n" + route(target.port, proxy_protocol=INBOUND % "required")
        with Relay(write_config(tmp_path, text)) as relay:
            header = build_v1(("198.51.100.7", 1), ("192.0.2.1", 2))
            with socket.create_connection(("127.0.0.1", relay.ports["pp"])) as sock:
                started = time.monotonic()
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    for byte in header:
                        sock.sendall(bytes([byte]))
                        time.sleep(0.25)
                assert 0.9 < time.monotonic() - started < 3
            assert relay.wait_for("rejected")[0]["reason"] == "PROXY header timeout"
            assert target.accepted == 0


@pytest.mark.parametrize("mode", ["required", "mixed", "optional"])
def test_untrusted_peers_are_never_believed(tmp_path: Path, mode: str) -> None:
    with HeaderTarget() as target:
        text = "routes:\n" + route(target.port, proxy_protocol=INBOUND % mode)
        with Relay(write_config(tmp_path, text)) as relay:
            for header in (build_v1(("10.9.9.9", 1), ("10.0.0.1", 2)), build_v2(("10.9.9.9", 1), ("10.0.0.1", 2))):
                assert reset_after_sending(relay.ports["pp"], header + b"data")
            relay.wait_for("rejected")
            # Rejections are logged once a second: the next one reports the one held back.
            time.sleep(1.1)
            assert reset_after_sending(relay.ports["pp"], build_v1(None, None))
            rejected = relay.wait_for("rejected", count=2)
            assert all(e["client"].startswith(CLIENT) for e in rejected)
            assert [e["suppressed"] for e in rejected] == [0, 1]
            assert target.accepted == 0


@pytest.mark.parametrize("mode", ["mixed", "optional"])
def test_untrusted_raw_peers_are_relayed(tmp_path: Path, mode: str) -> None:
    with HeaderTarget() as target:
        text = "routes:\n" + route(target.port, proxy_protocol=INBOUND % mode, relay_proxy_protocol_header="true")
        with Relay(write_config(tmp_path, text)) as relay:
            with connect_from(CLIENT, relay.ports["pp"]) as sock:
                sock.sendall(b"raw bytes")
                assert recv_exactly(sock, 9) == b"raw bytes"
                assert target.headers[0].source == sock.getsockname()


def test_optional_mode_lets_the_server_speak_first(tmp_path: Path) -> None:
    """SSH, SMTP, MySQL: the client waits for a banner, so the relay must not wait for it."""
    with HeaderTarget(reply=b"SSH-2.0-banner\r\n") as target:
        text = "routes:\n" + route(target.port, proxy_protocol=INBOUND % "optional", relay_proxy_protocol_header="true")
        with Relay(write_config(tmp_path, text)) as relay:
            with socket.create_connection(("127.0.0.1", relay.ports["pp"])) as sock:
                started = time.monotonic()
                assert recv_exactly(sock, 16) == b"SSH-2.0-banner\r\n"
                assert 0.25 < time.monotonic() - started < 3
            with socket.create_connection(("127.0.0.1", relay.ports["pp"])) as sock:
                sock.sendall(build_v2(("198.51.100.7", 4711), ("192.0.2.1", 22)))
                assert recv_exactly(sock, 16) == b"SSH-2.0-banner\r\n"
            assert target.headers[-1].source == ("198.51.100.7", 4711)


# -- real peers


@needs_haproxy
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front(tmp_path: Path, send_proxy: str) -> None:
    with HeaderTarget() as target:
        text = "routes:\n" + route(target.port, proxy_protocol=INBOUND % "required", relay_proxy_protocol_header="true")
        with Relay(write_config(tmp_path, text)) as relay:
            with HAProxy.in_front(tmp_path, relay.ports["pp"], send_proxy) as haproxy:
                with connect_from(CLIENT, haproxy.front) as sock:
                    sock.sendall(b"through haproxy")
                    assert recv_exactly(sock, 15) == b"through haproxy"
                    client = sock.getsockname()
                assert (CLIENT, client[1]) in [h.source for h in target.headers]
                closed = relay.wait_for("closed", client=f"{CLIENT}:{client[1]}")
                assert closed[0]["bytes_up"] == 15


@needs_haproxy
@pytest.mark.parametrize("version", [1, 2])
def test_haproxy_behind_accepts_our_header(tmp_path: Path, version: int) -> None:
    back = free_port()
    body = (
        f"frontend fe\n  mode http\n  bind 127.0.0.1:{back} accept-proxy\n"
        '  http-request return status 200 content-type text/plain lf-string "src=%[src]:%[src_port]"\n'
    )
    with HAProxy(tmp_path, body) as haproxy:
        haproxy.wait_listening(back)
        text = "routes:\n" + route(back, relay_proxy_protocol_header="true", proxy_protocol_version=version)
        with Relay(write_config(tmp_path, text)) as relay:
            with connect_from(CLIENT, relay.ports["pp"]) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                response = recv_all(sock)
                client = sock.getsockname()
            assert response.startswith(b"HTTP/1.1 200")
            assert response.endswith(f"src={CLIENT}:{client[1]}".encode())


class HTTPTarget(Target):
    """Answers one HTTP request with 'hello'."""

    def __init__(self) -> None:
        super().__init__(self.handle)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        assert request.startswith(b"GET / HTTP/1.1\r\n"), request
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_and_without_haproxy_protocol(tmp_path: Path) -> None:
    with HTTPTarget() as target:
        text = "routes:\n" + route(target.port, proxy_protocol=INBOUND % "optional")
        with Relay(write_config(tmp_path, text)) as relay:
            url = f"http://127.0.0.1:{relay.ports['pp']}/"
            for extra in (["--haproxy-protocol"], []):
                result = subprocess.run(["curl", "-sS", "--max-time", "10", *extra, url], capture_output=True, text=True)
                assert result.stdout == "hello", result.stderr
            assert not relay.actions("rejected")


def test_chain_of_two_relays(tmp_path: Path) -> None:
    with HeaderTarget() as target:
        inner_text = "routes:\n" + route(target.port, "inner", proxy_protocol=INBOUND % "required", relay_proxy_protocol_header="true")
        with Relay(write_config(tmp_path, inner_text, "inner.yml")) as inner:
            outer_text = "routes:\n" + route(inner.ports["inner"], "outer", relay_proxy_protocol_header="true")
            with Relay(write_config(tmp_path, outer_text, "outer.yml")) as outer:
                baselines = (inner.fd_count(), outer.fd_count())
                with connect_from(CLIENT, outer.ports["outer"]) as sock:
                    sock.sendall(b"two hops")
                    assert recv_exactly(sock, 8) == b"two hops"
                    client = (CLIENT, sock.getsockname()[1])
                assert target.headers[0].source == client
                assert inner.wait_for("closed")[0]["client"] == f"{CLIENT}:{client[1]}"
                assert outer.wait_for("closed")[0]["client"] == f"{CLIENT}:{client[1]}"
                poll(lambda: (inner.fd_count(), outer.fd_count()) <= baselines)
                assert not inner.actions("rejected")
