"""
reuse_port: several twistd processes share one route's TCP and UDP ports,
and the kernel spreads clients across them.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.harness import Relay, Target, poll, recv_exactly, run_twistd, write_config
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
