"""
Access control and connection limits end to end (real twistd processes).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from streamrelay.proxyproto import build_v2
from tests.harness import connect_from, tcp_route, Relay, Target, poll, recv_all, recv_exactly, write_config



#: The C{splice} setting of every route this module writes (see L{splice}).
pytestmark = pytest.mark.usefixtures("relay_paths")


def route(target_port: int, name: str = "r", **fields: object) -> str:
    return tcp_route(target_port, name, **fields)


def echoes(sock: socket.socket) -> bool:
    sock.sendall(b"ping")
    return recv_exactly(sock, 4) == b"ping"


def refused(sock: socket.socket) -> bool:
    try:
        return recv_all(sock) == b""
    except ConnectionResetError:
        return True


def refused_from(source: str, port: int) -> bool:
    """Connect and wait for the close; a reset may even beat connect() back."""
    try:
        sock = connect_from(source, port)
    except ConnectionResetError:
        return True
    with sock:
        return refused(sock)


def test_route_acl_replaces_the_top_level_one(tmp_path: Path) -> None:
    with Target() as target:
        text = (
            'acl: {default: deny, allow_local: false, allow: ["ip:127.0.0.3"]}\n'
            "routes:\n"
            + route(target.port, "top")
            + route(target.port, "own", acl='{default: deny, allow_local: false, allow: ["cidr:127.0.0.2/32"]}')
        )
        with Relay(write_config(tmp_path, text)) as relay:
            with connect_from("127.0.0.2", relay.ports["own"]) as sock:
                assert echoes(sock)
            with connect_from("127.0.0.3", relay.ports["top"]) as sock:
                assert echoes(sock)
            accepted_before = target.accepted
            assert refused_from("127.0.0.3", relay.ports["own"])
            assert refused_from("127.0.0.2", relay.ports["top"])
            denied = relay.wait_for("denied", count=1)
            assert denied[0]["rule"] == "default deny" and denied[0]["client"].startswith("127.0.0.3:")
            assert target.accepted == accepted_before


def test_allow_local_admits_loopback_despite_deny_rules(tmp_path: Path) -> None:
    with Target() as target:
        text = 'acl: {deny: ["cidr:127.0.0.0/8"]}\nroutes:\n' + route(target.port)
        with Relay(write_config(tmp_path, text)) as relay, connect_from("127.0.0.2", relay.ports["r"]) as sock:
            assert echoes(sock)


def test_acl_checks_the_address_from_the_proxy_header(tmp_path: Path) -> None:
    with Target() as target:
        text = (
            "proxy_protocol: {mode: required, trusted_proxies: [127.0.0.1]}\n"
            'acl: {deny: ["cidr:198.51.100.0/24"]}\nroutes:\n' + route(target.port)
        )
        with Relay(write_config(tmp_path, text)) as relay:
            with socket.create_connection(("127.0.0.1", relay.ports["r"])) as sock:
                sock.sendall(build_v2(("198.51.100.7", 1000), ("192.0.2.1", 22)) + b"x")
                assert refused(sock)
            denied = relay.wait_for("denied")[0]
            assert denied["client"] == "198.51.100.7:1000" and denied["rule"] == "deny cidr:198.51.100.0/24"
            assert target.accepted == 0
            with socket.create_connection(("127.0.0.1", relay.ports["r"])) as sock:
                sock.sendall(build_v2(("203.0.113.5", 1000), ("192.0.2.1", 22)))
                assert echoes(sock)


def test_max_connections_holds_newcomers_in_the_backlog(tmp_path: Path) -> None:
    with Target() as target:
        text = "routes:\n" + route(target.port, max_connections=3)
        with Relay(write_config(tmp_path, text), "--log-level", "debug") as relay:
            first = [socket.create_connection(("127.0.0.1", relay.ports["r"]), timeout=15) for _ in range(3)]
            for sock in first:
                assert echoes(sock)
            fourth = socket.create_connection(("127.0.0.1", relay.ports["r"]), timeout=15)
            fourth.sendall(b"wait")
            fourth.settimeout(0.5)
            with pytest.raises(socket.timeout):
                fourth.recv(4)  # connected in the kernel's backlog, never accepted
            assert len(relay.actions("accept")) == 3 and target.accepted == 3
            first.pop().close()
            fourth.settimeout(15)
            assert recv_exactly(fourth, 4) == b"wait"
            assert len(relay.wait_for("accept", count=4)) == 4
            for sock in first + [fourth]:
                sock.close()


def test_max_connections_per_client(tmp_path: Path) -> None:
    with Target() as target:
        text = "routes:\n" + route(target.port, max_connections_per_client=2)
        with Relay(write_config(tmp_path, text)) as relay:
            mine = [connect_from("127.0.0.2", relay.ports["r"]) for _ in range(2)]
            for sock in mine:
                assert echoes(sock)
            assert refused_from("127.0.0.2", relay.ports["r"])
            limited = relay.wait_for("limited")[0]
            assert limited["client"].startswith("127.0.0.2:") and "max_connections_per_client" in limited["reason"]
            with connect_from("127.0.0.3", relay.ports["r"]) as other:
                assert echoes(other)
            mine.pop().close()
            poll(lambda: len(relay.actions("closed")) >= 2)
            with connect_from("127.0.0.2", relay.ports["r"]) as again:
                assert echoes(again)
            for sock in mine:
                sock.close()


def test_denials_are_rate_limited_in_the_log(tmp_path: Path) -> None:
    with Target() as target:
        text = 'acl: {default: deny, allow_local: false, allow: ["ip:10.9.9.9"]}\nroutes:\n' + route(target.port)
        with Relay(write_config(tmp_path, text)) as relay:
            for _ in range(50):
                assert refused_from("127.0.0.2", relay.ports["r"])
            first = relay.wait_for("denied")
            assert len(first) < 10  # 50 denials within a few seconds: about one line a second
            assert target.accepted == 0


def test_max_connections_holds_exactly_under_a_burst(tmp_path: Path) -> None:
    """
    Twisted's port accepts up to C{numberAccepts} connections per readiness
    event: with 200 clients waiting in the backlog, one freed place must let
    in one client, not a batch.
    """
    with Target() as target:
        text = "routes:\n" + route(target.port, max_connections=5)
        with Relay(write_config(tmp_path, text), "--log-level", "debug") as relay:
            port = relay.ports["r"]
            held = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(5)]
            for sock in held:
                assert echoes(sock)
            waiting = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(200)]
            for sock in waiting:
                sock.sendall(b"x")
            held.pop().close()
            relay.wait_for("accept", count=6)
            held.pop().close()
            relay.wait_for("accept", count=7)
            poll(lambda: target.accepted >= 7)
            assert len(relay.actions("accept")) == 7
            open_now = peak = 0
            for event in list(relay.events):
                open_now += {"accept": 1, "closed": -1}.get(event.get("action"), 0)
                peak = max(peak, open_now)
            assert peak == 5
            for sock in held + waiting:
                sock.close()


def test_each_kind_of_refusal_has_its_own_log_throttle(tmp_path: Path) -> None:
    """A flood of ACL denials does not hide a per-client limit refusal in the same second."""
    with Target() as target:
        acl = 'acl: {default: allow, allow_local: false, deny: ["ip:127.0.0.2"]}\n'
        text = acl + "routes:\n" + route(target.port, max_connections_per_client=1)
        with Relay(write_config(tmp_path, text)) as relay:
            for _ in range(20):
                assert refused_from("127.0.0.2", relay.ports["r"])
            with connect_from("127.0.0.3", relay.ports["r"]) as first:
                assert echoes(first)
                assert refused_from("127.0.0.3", relay.ports["r"])
                limited = relay.wait_for("limited")
            denied = relay.wait_for("denied")
            assert limited[0]["client"].startswith("127.0.0.3:") and limited[0]["suppressed"] == 0
            assert denied[0]["client"].startswith("127.0.0.2:")
