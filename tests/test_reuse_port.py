"""
reuse_port: several twistd processes share one route's TCP and UDP ports,
and the kernel spreads clients across them.
"""

from __future__ import annotations

import socket
from pathlib import Path

from streamrelay.proxyproto import build_v2
from tests.harness import (
    HAProxy, HeaderTarget, Relay, Target, connect_from, needs_haproxy, poll, recv_exactly, run_twistd, write_config,
)
from tests.test_udp import UDPEcho


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (nothing else binds here concurrently)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def config(tcp_target: int, udp_target: int, port: int, reuse: bool) -> str:
    flag = "true" if reuse else "false"
    return (
        "routes:\n"
        f"  t: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: '{port}:{tcp_target}', reuse_port: {flag}}}\n"
        f"  u: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: '{port}:{udp_target}', reuse_port: {flag}}}\n"
    )


def test_two_processes_share_the_ports(tmp_path: Path) -> None:
    port = free_port()
    with Target() as tcp_target, UDPEcho() as udp_target:
        path = write_config(tmp_path, config(tcp_target.port, udp_target.port, port, reuse=True))
        with Relay(path, "--log-level", "debug") as first, Relay(path, "--log-level", "debug") as second:
            assert first.ports == second.ports == {"t": port, "u": port}
            for i in range(40):
                with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                    sock.sendall(b"%02d" % i)
                    assert recv_exactly(sock, 2) == b"%02d" % i
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(5)
                    sock.connect(("127.0.0.1", port))
                    sock.send(b"u%02d" % i)
                    assert sock.recv(100) == b"u%02d" % i
            poll(lambda: len(first.actions("closed")) + len(second.actions("closed")) == 40)
            assert first.actions("closed") and second.actions("closed")
            assert first.actions("session-open") and second.actions("session-open")


def test_without_reuse_port_the_second_process_cannot_bind(tmp_path: Path) -> None:
    port = free_port()
    with Target() as tcp_target, UDPEcho() as udp_target:
        path = write_config(tmp_path, config(tcp_target.port, udp_target.port, port, reuse=False))
        with Relay(path):
            result = run_twistd(path)
        assert result.returncode != 0
        assert f"route 't': cannot listen on tcp 127.0.0.1:{port}" in result.stdout + result.stderr


@needs_haproxy
def test_two_processes_behind_haproxy_keep_the_real_client(tmp_path: Path) -> None:
    """
    Many hosts' deployment in small: an L4 balancer (HAProxy) sends PROXY v2
    to N processes sharing a port; each target still sees the real client.
    """
    port = free_port()
    client = "127.0.0.2"
    with HeaderTarget() as target:
        text = "routes:\n" + (
            f"  t: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: '{port}:{target.port}', reuse_port: true,"
            " relay_proxy_protocol_header: true, proxy_protocol: {mode: required, trusted_proxies: [127.0.0.1]}}\n"
        )
        path = write_config(tmp_path, text)
        with Relay(path) as first, Relay(path) as second:
            with HAProxy.in_front(tmp_path, port) as haproxy:
                sources = []
                for i in range(40):
                    with connect_from(client, haproxy.front) as sock:
                        sock.sendall(b"%02d" % i)
                        assert recv_exactly(sock, 2) == b"%02d" % i
                        sources.append(sock.getsockname())


                def ours(relay: Relay) -> list[dict]:  # not wait_listening's probe, from haproxy itself
                    return [e for e in relay.actions("closed") if e["client"].startswith(client + ":")]

                poll(lambda: len(ours(first)) + len(ours(second)) == 40)
            assert ours(first) and ours(second)  # both processes took some
            relayed = sorted(h.source for h in target.headers if h.source is not None and h.source[0] == client)
            assert relayed == sorted(sources)  # the real clients, every one


def test_cloud_balancer_ids_are_logged(tmp_path: Path) -> None:
    """AWS, Azure and GCP ids in an inbound PROXY v2 header reach the closed event."""
    aws = bytes([0x01]) + b"vpce-0123456789abcdef0"
    azure = bytes([0x01]) + (553665985).to_bytes(4, "little")
    gcp = (1234567890123).to_bytes(8, "big")
    with Target() as target:
        text = "routes:\n" + (
            f"  t: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{target.port}',"
            " proxy_protocol: {mode: required, trusted_proxies: [127.0.0.1]}}\n"
        )
        with Relay(write_config(tmp_path, text)) as relay:
            header = build_v2(("198.51.100.7", 40000), ("203.0.113.1", 443), tlvs=[(0xEA, aws), (0xEE, azure), (0xE0, gcp)])
            with socket.create_connection(("127.0.0.1", relay.ports["t"]), timeout=15) as sock:
                sock.sendall(header + b"hi")
                assert recv_exactly(sock, 2) == b"hi"
            closed = relay.wait_for("closed")[0]
            assert closed["client"] == "198.51.100.7:40000"
            assert (closed["aws_vpce_id"], closed["azure_linkid"], closed["gcp_psc_id"]) == (
                "vpce-0123456789abcdef0", "553665985", "1234567890123",
            )
