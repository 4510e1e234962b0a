"""
The PROXY protocol on UDP routes and the session limits, end to end: real
C{twistd -n streamrelay} processes between blocking loopback sockets and a
target that decodes each datagram's header with this module's own codec
(not streamrelay's), so a header both sides got wrong the same way fails.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest

from streamrelay.config import ConfigError, parse_config
from streamrelay.datagrams import DatagramDropped, read_header
from tests.harness import DEADLINE, Relay, poll, write_config
from tests.test_status import metrics, route_samples, status_listen
from tests.test_udp import UDPEcho

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: PROXY v2 header with IPv4 DGRAM addresses and no TLV.
HEADER_V4 = 16 + 12


def encode(source: tuple[str, int], destination: tuple[str, int], *, command: int = 0x21, family: int = 0x12) -> bytes:
    """A v2 header for IPv4 addresses, with the command and family bytes given."""
    body = ipaddress.ip_address(source[0]).packed + ipaddress.ip_address(destination[0]).packed
    body += struct.pack("!HH", source[1], destination[1])
    return SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


def decode(datagram: bytes) -> tuple[tuple[str, int], tuple[str, int], dict[int, bytes], bytes]:
    """Source, destination, TLVs and payload of a v2 PROXY DGRAM datagram; AssertionError if it is not one."""
    assert datagram[:12] == SIGNATURE, datagram[:16]
    command, family, length = struct.unpack("!BBH", datagram[12:16])
    assert command == 0x21 and family in (0x12, 0x22), (command, family)
    size = 4 if family == 0x12 else 16
    body, payload = datagram[16 : 16 + length], datagram[16 + length :]
    source, destination = ipaddress.ip_address(body[:size]), ipaddress.ip_address(body[size : 2 * size])
    source_port, destination_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    tlvs, offset = {}, 2 * size + 4
    while offset < len(body):
        kind, tlv_length = struct.unpack("!BH", body[offset : offset + 3])
        tlvs[kind] = body[offset + 3 : offset + 3 + tlv_length]
        offset += 3 + tlv_length
    return (str(source), source_port), (str(destination), destination_port), tlvs, payload


class HeaderTarget(UDPEcho):
    """
    A UDP target behind a relay with C{udp_proxy_protocol}: records every
    datagram's header and echoes the payload alone (a datagram without a
    valid header is recorded in C{errors} and not answered).
    """

    def __init__(self) -> None:
        self.headers: list[tuple[tuple[str, int], tuple[str, int], dict[int, bytes], bytes]] = []
        self.errors: list[bytes] = []
        super().__init__()

    def answer(self, data: bytes, sender: tuple) -> None:
        try:
            header = decode(data)
        except (AssertionError, struct.error, ValueError):
            self.errors.append(data)
            return
        self.headers.append(header)
        self.sock.sendto(header[3], sender)


def client_socket(source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(DEADLINE)
    return sock


def exchange(sock: socket.socket, port: int, payload: bytes) -> bytes:
    sock.sendto(payload, ("127.0.0.1", port))
    return sock.recv(65535)


def udp_metrics(relay: Relay, route: str) -> dict:
    return route_samples(metrics(status_listen(relay)), route, "udp")


def test_chained_relays_keep_the_real_client(tmp_path: Path) -> None:
    """outbound relay -> inbound relay -> target: every datagram's header names the first client."""
    with HeaderTarget() as target:
        inner_config = write_config(tmp_path, f"""
            routes:
              inner:
                scheme: udp4
                bind: 127.0.0.1
                host: 127.0.0.1
                port: "0:{target.port}"
                udp_proxy_protocol: true
                proxy_protocol_unique_id: true
                proxy_protocol: {{mode: required, trusted_proxies: [127.0.0.1]}}
        """, "inner.yml")
        with Relay(inner_config) as inner:
            outer_config = write_config(tmp_path, f"""
                routes:
                  outer: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: "0:{inner.ports['inner']}",
                           udp_proxy_protocol: true}}
            """, "outer.yml")
            with Relay(outer_config) as outer:
                clients = [client_socket("127.0.0.3"), client_socket("127.0.0.4")]
                for i in range(5):
                    for sock in clients:
                        assert exchange(sock, outer.ports["outer"], b"ping %d" % i) == b"ping %d" % i
                for sock in clients:
                    sock.close()
    assert not target.errors
    assert len(target.headers) == 10
    ids: dict[tuple[str, int], set[bytes]] = {}
    for source, destination, tlvs, _ in target.headers:
        assert destination == ("127.0.0.1", outer.ports["outer"])
        ids.setdefault(source, set()).add(tlvs[0x05])
    assert {source[0] for source in ids} == {"127.0.0.3", "127.0.0.4"}
    assert [len(one) for one in ids.values()] == [1, 1]  # one unique id per session...
    assert len(set.union(*ids.values())) == 2  # ...and one session per client


MALFORMED = {
    "missing": [b"no header at all"],
    "v1": [b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 53\r\nquery"],
    "stream": [encode(("192.0.2.1", 1000), ("192.0.2.2", 53), family=0x11) + b"query"],
    "truncated": [
        encode(("192.0.2.1", 1000), ("192.0.2.2", 53))[:20],
        SIGNATURE + b"\x21",
    ],
    "invalid": [
        encode(("192.0.2.1", 1000), ("192.0.2.2", 53), command=0x31) + b"query",  # version 3
        encode(("192.0.2.1", 1000), ("192.0.2.2", 53), command=0x22) + b"query",  # command 2
        encode(("192.0.2.1", 1000), ("192.0.2.2", 53), family=0x32) + b"query",  # AF_UNIX
        SIGNATURE + struct.pack("!BBH", 0x21, 0x12, 8) + bytes(8) + b"query",  # shorter than its addresses
        SIGNATURE + struct.pack("!BBH", 0x21, 0x12, 5000) + bytes(5000),  # beyond 4096
        SIGNATURE + struct.pack("!BBH", 0x21, 0x12, 19) + bytes(12) + b"\x03\x00\x04" + bytes(4),  # bad CRC32c
    ],
    "local": [
        SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0) + b"health check with data",
        SIGNATURE + struct.pack("!BBH", 0x21, 0x00, 0) + b"PROXY without addresses",
    ],
}


def test_inbound_headers_per_datagram(tmp_path: Path) -> None:
    """
    From the trusted peer (127.0.0.2): 100 clients get 100 sessions whose
    replies come back to the peer, and every malformed header is dropped and
    counted by reason; the untrusted peer (127.0.0.1) gets nothing through.
    """
    with HeaderTarget() as target:
        config = write_config(tmp_path, f"""
            status: {{listen: "127.0.0.1:0"}}
            routes:
              dns:
                scheme: udp4
                bind: 127.0.0.1
                host: 127.0.0.1
                port: "0:{target.port}"
                udp_proxy_protocol: true
                proxy_protocol: {{mode: required, trusted_proxies: [127.0.0.2]}}
        """)
        with Relay(config) as relay:
            port = relay.ports["dns"]
            destination = ("127.0.0.1", port)
            peer, stranger = client_socket("127.0.0.2"), client_socket("127.0.0.1")
            clients = [(f"198.51.100.{i}", 40000 + i) for i in range(1, 101)]
            for client in clients:
                peer.sendto(encode(client, destination) + b"q" + client[0].encode(), destination)
            replies = sorted(peer.recv(65535) for _ in clients)
            assert replies == sorted(b"q" + client[0].encode() for client in clients)
            assert sorted(h[0] for h in target.headers) == sorted(clients)
            assert {h[1] for h in target.headers} == {destination}

            for datagrams in MALFORMED.values():
                for datagram in datagrams:
                    peer.sendto(datagram, destination)
            stranger.sendto(encode(("192.0.2.9", 9), destination) + b"spoofed", destination)
            stranger.sendto(b"plain", destination)
            # A last good datagram: once it is answered, everything before it was judged.
            assert exchange(peer, port, encode(clients[0], destination) + b"last") == b"last"
            samples = udp_metrics(relay, "dns")
            peer.close()
            stranger.close()
    assert samples["streamrelay_udp_sessions_active"] == 100
    assert samples["streamrelay_udp_sessions_opened_total"] == 100
    expected = {reason: float(len(datagrams)) for reason, datagrams in MALFORMED.items()}
    assert samples["streamrelay_proxy_header_errors_total"] == {**expected, "untrusted": 2.0}
    assert not target.errors
    assert len(target.received) == 101  # the 100 clients and the last datagram: no malformed one


def test_max_replies_and_max_requests_close_sessions(tmp_path: Path) -> None:
    with UDPEcho() as target:
        config = write_config(tmp_path, f"""
            status: {{listen: "127.0.0.1:0"}}
            defaults: {{max_udp_sessions: 10}}
            routes:
              dns: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: "0:{target.port}", udp_max_replies: 1}}
              syslog: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: "0:{target.port}",
                        udp_max_requests: 2}}
        """)
        with Relay(config) as relay:
            sock = client_socket()
            for i in range(1000):
                assert exchange(sock, relay.ports["dns"], b"query %d" % i) == b"query %d" % i
            for i in range(20):
                sock.sendto(b"<13>log %d" % i, ("127.0.0.1", relay.ports["syslog"]))
            poll(lambda: sum(data.startswith(b"<13>") for _, data in target.received) == 20)
            sock.close()
            dns, syslog = udp_metrics(relay, "dns"), udp_metrics(relay, "syslog")
    # One client address, 1,000 sessions one after the other: the table never held more than one.
    assert dns["streamrelay_udp_sessions_active"] == 0
    assert dns["streamrelay_udp_sessions_closed_total"] == {"max_replies": 1000}
    assert dns["streamrelay_refused_total"]["limit"] == 0
    assert syslog["streamrelay_udp_sessions_active"] == 0
    assert syslog["streamrelay_udp_sessions_closed_total"] == {"max_requests": 10}


def test_datagrams_too_large_with_the_header_are_dropped(tmp_path: Path) -> None:
    with HeaderTarget() as target:
        config = write_config(tmp_path, f"""
            status: {{listen: "127.0.0.1:0"}}
            routes:
              big: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: "0:{target.port}", udp_proxy_protocol: true}}
        """)
        with Relay(config) as relay:
            port = relay.ports["big"]
            sock = client_socket()
            largest = 65507 - HEADER_V4
            sock.sendto(b"x" * (largest + 1), ("127.0.0.1", port))
            sock.sendto(b"y" * 65507, ("127.0.0.1", port))  # the largest IPv4 payload
            assert exchange(sock, port, b"z" * largest) == b"z" * largest
            relay.wait_for("oversized", size=largest + 1, header=HEADER_V4, limit=65507)
            samples = udp_metrics(relay, "big")
            sock.close()
    assert [len(data) for _, data in target.received] == [65507]
    assert samples["streamrelay_datagrams_oversized_total"] == 2
    assert samples["streamrelay_datagrams_dropped_total"] == 2


@pytest.mark.parametrize("text, message", [
    ("r: {scheme: tcp, port: '1:2', udp_proxy_protocol: true}", "only supported for udp routes, not tcp"),
    ("r: {scheme: tcp, port: '1:2', udp_max_replies: 1}", "only supported for udp routes, not tcp"),
    ("r: {scheme: udp, port: '1:2', udp_max_requests: -1}", "expected an integer from 0 to"),
    ("r: {scheme: udp, port: '1:2', udp_proxy_protocol: 1}", "expected true or false"),
])
def test_udp_fields_are_checked(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(f"routes:\n  {text}\n")


def test_udp_fields_are_read() -> None:
    [route] = parse_config("""
        routes:
          r:
            scheme: udp
            port: "1:2"
            udp_proxy_protocol: true
            proxy_protocol_unique_id: true
            udp_max_replies: 1
            udp_max_requests: 3
            proxy_protocol: {mode: mixed, trusted_proxies: [10.0.0.0/8]}
    """).routes
    assert (route.udp_proxy_protocol, route.proxy_protocol_unique_id) == (True, True)
    assert (route.udp_max_replies, route.udp_max_requests) == (1, 3)
    assert route.proxy_protocol.mode == "mixed" and route.proxy_protocol.trusts("10.1.2.3")


GOOD = encode(("192.0.2.1", 1000), ("192.0.2.2", 53)) + b"query"


@pytest.mark.parametrize("mode, peer, datagram, outcome", [
    ("required", "10.0.0.1", GOOD, ("192.0.2.1", 1000)),
    ("required", "10.0.0.1", b"query", "missing"),
    ("required", "192.0.2.7", b"query", "untrusted"),
    ("mixed", "10.0.0.1", b"query", "missing"),
    ("mixed", "192.0.2.7", b"query", ("192.0.2.7", 5)),
    ("mixed", "192.0.2.7", GOOD, "untrusted"),
    ("optional", "10.0.0.1", GOOD, ("192.0.2.1", 1000)),
    ("optional", "10.0.0.1", b"query", ("10.0.0.1", 5)),
    ("optional", "192.0.2.7", GOOD, "untrusted"),
    ("optional", "192.0.2.7", b"PROXY TCP4 ...", "untrusted"),
])
def test_each_mode_judges_a_datagram_alone(mode: str, peer: str, datagram: bytes, outcome: object) -> None:
    """Trusted 10/8: who must, may or must not send a header; the payload is what follows it."""
    [route] = parse_config(f"""
        routes:
          r: {{scheme: udp, port: "1:2", proxy_protocol: {{mode: {mode}, trusted_proxies: [10.0.0.0/8]}}}}
    """).routes
    try:
        client, _, payload = read_header(route.proxy_protocol, datagram, (peer, 5))
    except DatagramDropped as e:
        assert e.reason == outcome
    else:
        assert (client, payload) == (outcome, b"query")
